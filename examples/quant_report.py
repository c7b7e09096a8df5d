"""Where quantization hurts a trained LeNet-5: the per-tensor report.

Loads the models that `examples/lenet_quant.py --export_tflite` wrote
(`lenet_qat.keras` and `lenet_int8.tflite` in --model_dir), runs
`kq.quant_report` on MNIST test images and prints the table; writes it as
JSON and as a PNG (SQNR per tensor, clipped fractions; needs matplotlib,
the `plot` extra). With --sensitivity it also measures
the accuracy with each layer in float in turn (`kq.sensitivity`).

Usage:
    bash scripts/get_data.sh mnist
    python examples/lenet_quant.py --export_tflite
    python examples/quant_report.py [--model_dir runs/lenet] [--sensitivity]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idx_data  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_string("model_dir", "runs/lenet", "Where examples/lenet_quant.py wrote its models.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Directory with the MNIST IDX files (default: data/mnist and the usual places).",
)
flags.DEFINE_integer("samples", 2000, "Test images to measure on.")
flags.DEFINE_string("plot", None, "Where to write the PNG (default: <model_dir>/quant_report.png).")
flags.DEFINE_float("threshold_db", 20.0, "SQNR below which the plot marks a tensor.")
flags.DEFINE_bool("sensitivity", False, "Also measure the accuracy with each layer in float.")
FLAGS = flags.FLAGS


def _models():
    paths = {
        name: os.path.join(FLAGS.model_dir, name)
        for name in ("lenet_qat.keras", "lenet_int8.tflite")
    }
    missing = [path for path in paths.values() if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(
            f"Not found: {', '.join(missing)}. Run `python examples/lenet_quant.py "
            f"--export_tflite --output_dir {FLAGS.model_dir}` first."
        )
    return (
        keras.saving.load_model(paths["lenet_qat.keras"]),
        paths["lenet_int8.tflite"],
    )


def main(argv):
    del argv
    qat, tflite_path = _models()
    _, (x_test, y_test) = idx_data.load_for_training("mnist", FLAGS.data_dir)
    x, y = x_test[: FLAGS.samples], y_test[: FLAGS.samples]
    # The reference is the QAT model with its quantizers bypassed: the same
    # weights, so the SQNR measures quantization, not the QAT epochs' changes.
    report = kq.quant_report(qat, x, tflite_model=tflite_path)
    print(report)
    worst = report.ranked()[0]
    print(
        f"\nlowest SQNR of its own: {worst['tensor']} ({worst['local_sqnr_db']:.1f} dB); "
        f"output SQNR against float: {report.rows[-1]['sqnr_db']:.1f} dB"
    )
    report.to_json(os.path.join(FLAGS.model_dir, "quant_report.json"))
    plot_path = FLAGS.plot or os.path.join(FLAGS.model_dir, "quant_report.png")
    report.plot(plot_path, threshold_db=FLAGS.threshold_db)
    print(f"written: {plot_path}, {os.path.join(FLAGS.model_dir, 'quant_report.json')}")
    if FLAGS.sensitivity:
        result = kq.sensitivity(qat, x, y)
        print(result)


if __name__ == "__main__":
    app.run(main)
