"""LeNet-5 quantization-aware training on MNIST, MindSpore's lenet_quant flow.

1. Define LeNet-5 as a fusion network (Conv2DBnAct / DenseBnAct).
2. Train it in float and save it.
3. Load the float model, convert it with `convert_quant_network`
   (quant_delay=900, the default TFLite int8 scheme: symmetric narrow-range
   weights, per channel for the convolutions and per tensor for the dense
   layers, asymmetric activations) and QAT-train it from the float weights.
4. Evaluate (int8-simulated accuracy), save, and print a table.
5. With --export_tflite: write the int8 TFLite model, evaluate it on the
   full test set and compare it with the Keras model. With --export_onnx
   the same for a QDQ ONNX model run by ONNX Runtime (the `onnx` extra).

MindSpore's lenet_quant quantizes the weights asymmetrically and per
channel (`--mindspore_weights`); TFLite's int8 kernels need weight zero
point 0, so such a model trains and evaluates but does not export.

Both TFLite models are written without tensor names (`strip_names=True`),
so the size ratio compares like with like. TensorFlow's own logging of the
export is shown with --verbose.

Usage:
    bash scripts/get_data.sh mnist
    python examples/lenet_quant.py [--data_dir DIR] [--float_epochs 10]
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idx_data  # noqa: E402
import quant_flags  # noqa: E402
import strategies  # noqa: E402
from models import lenet5  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_string(
    "data_dir", None, "Directory with the MNIST IDX files (raw or .gz); default: data/mnist."
)
flags.DEFINE_string("output_dir", "runs/lenet", "Where models and results are written.")
flags.DEFINE_integer("float_epochs", 10, "Float training epochs.")
flags.DEFINE_integer("qat_epochs", 3, "Quantization-aware training epochs.")
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_float("float_lr", 1e-3, "Adam learning rate of float training.")
flags.DEFINE_float("qat_lr", 1e-4, "Adam learning rate of QAT.")
flags.DEFINE_integer("quant_delay", 900, "Training steps before fake quantization starts.")
flags.DEFINE_integer(
    "limit_train", 0, "Use only this many training images (0: all); for smoke runs."
)
flags.DEFINE_integer("seed", 1, "Random seed.")
flags.DEFINE_bool("verbose", False, "Show TensorFlow's own logging of the TFLite export.")
flags.DEFINE_bool("export_tflite", False, "Export, evaluate and compare an int8 TFLite model.")
flags.DEFINE_bool(
    "export_onnx",
    False,
    "Export a QDQ ONNX model, evaluate it in ONNX Runtime and compare it (needs the onnx extra).",
)
flags.DEFINE_bool(
    "per_channel_weights",
    None,
    "Per-channel weight ranges for every layer, or per tensor for every layer "
    "(default: keras-qat's default, per channel for convolutions only).",
)
flags.DEFINE_bool(
    "mindspore_weights",
    False,
    "MindSpore's lenet_quant weights: asymmetric, full range, per channel. Cannot be "
    "combined with --export_tflite (TFLite's int8 weights are symmetric).",
)
FLAGS = flags.FLAGS


def train(model, data, epochs, learning_rate, strategy):
    (x_train, y_train), (x_test, y_test) = data
    times = strategies.fit(
        model,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=FLAGS.batch_size,
        optimizer=keras.optimizers.Adam(learning_rate),
        strategy=strategy,
        seed=FLAGS.seed,
    )
    # Median, so that the first epoch's tracing does not dominate.
    return strategies.accuracy(model, x_test, y_test), float(np.median(times))


def export(float_path, qat_path, data):
    """Writes float and int8 TFLite models and measures the int8 one.

    The models are loaded from their .keras files, outside any strategy.
    """
    network = keras.saving.load_model(float_path)
    qat_network = keras.saving.load_model(qat_path)
    _, (x_test, y_test) = data
    int8_path = os.path.join(FLAGS.output_dir, "lenet_int8.tflite")
    int8_bytes = kq.export_tflite(qat_network, int8_path, strip_names=True, verbose=FLAGS.verbose)
    float_bytes = kq.export_float_tflite(
        network,
        os.path.join(FLAGS.output_dir, "lenet_float.tflite"),
        strip_names=True,
        verbose=FLAGS.verbose,
    )
    tflite_out, _ = kq.run_tflite(int8_bytes, x_test)
    report = kq.compare_tflite(qat_network, int8_bytes, x_test)
    return {
        "tflite_accuracy": float(np.mean(tflite_out.argmax(-1) == y_test)),
        **report,
        "float_tflite_bytes": len(float_bytes),
        "int8_tflite_bytes": len(int8_bytes),
        "size_ratio": len(int8_bytes) / len(float_bytes),
    }


def export_onnx(qat_path, data):
    """Writes the QDQ ONNX model and measures it in ONNX Runtime."""
    qat_network = keras.saving.load_model(qat_path)
    _, (x_test, y_test) = data
    onnx_path = os.path.join(FLAGS.output_dir, "lenet_int8.onnx")
    onnx_bytes = kq.export_onnx(qat_network, onnx_path, verbose=FLAGS.verbose)
    onnx_out, _ = kq.run_onnx(onnx_bytes, x_test)
    report = kq.compare_onnx(qat_network, onnx_bytes, x_test)
    return {
        "onnx_accuracy": float(np.mean(onnx_out.argmax(-1) == y_test)),
        **{f"onnx_{key}": value for key, value in report.items()},
        "int8_onnx_bytes": len(onnx_bytes),
    }


def main(argv):
    del argv
    quant_flags.num_bits()  # a bad value fails before training
    for export_flag in ("export_tflite", "export_onnx"):
        if FLAGS.mindspore_weights and FLAGS[export_flag].value:
            raise app.UsageError(
                "--mindspore_weights (asymmetric weights) cannot be exported to int8 TFLite "
                "or ONNX, whose weights have zero point 0. Received: --mindspore_weights "
                f"--{export_flag}"
            )
    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    strategy = strategies.make_strategy(FLAGS.strategy, FLAGS.tpu)
    data = idx_data.load_for_training("mnist", FLAGS.data_dir, FLAGS.limit_train)
    # One writer: under multi-worker training the other workers save to a
    # temporary directory and stop after training.
    chief = strategies.is_chief(strategy)
    out_dir = FLAGS.output_dir if chief else tempfile.mkdtemp()
    float_path = os.path.join(out_dir, "lenet_float.keras")
    qat_path = os.path.join(out_dir, "lenet_qat.keras")
    with strategy.scope():
        results = train_both(data, strategy, float_path, qat_path)
    if not chief:
        return
    if FLAGS.export_tflite:
        results.update(export(float_path, qat_path, data))
    if FLAGS.export_onnx:
        results.update(export_onnx(qat_path, data))
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, float_path, qat_path)


def train_both(data, strategy, float_path, qat_path):
    """Float training, conversion, QAT; returns accuracies and epoch times."""
    network = lenet5()
    float_accuracy, float_epoch = train(network, data, FLAGS.float_epochs, FLAGS.float_lr, strategy)
    network.save(float_path)

    # A trained float network converts with its weights.
    network = keras.saving.load_model(float_path)
    per_channel = FLAGS.per_channel_weights
    options = {} if per_channel is None else {"per_channel": [per_channel, False]}
    if FLAGS.mindspore_weights:
        per_channel = True
        options = {"per_channel": [True, False], "symmetric": [False, False]}
    qat_network = kq.convert_quant_network(
        network,
        quant_delay=FLAGS.quant_delay,
        bn_fold=False,
        num_bits=quant_flags.num_bits(),
        range_learning=FLAGS.range_learning,
        **options,
    )
    qat_accuracy, qat_epoch = train(qat_network, data, FLAGS.qat_epochs, FLAGS.qat_lr, strategy)
    qat_network.save(qat_path)
    return {
        "float_accuracy": float_accuracy,
        "qat_accuracy": qat_accuracy,
        "float_epoch_seconds": float_epoch,
        "qat_epoch_seconds": qat_epoch,
        "float_epochs": FLAGS.float_epochs,
        "qat_epochs": FLAGS.qat_epochs,
        "train_images": int(len(data[0][0])),
        "per_channel_weights": "conv only" if per_channel is None else per_channel,
        "mindspore_weights": FLAGS.mindspore_weights,
        "num_bits": list(quant_flags.num_bits()),
        "range_learning": FLAGS.range_learning,
        "strategy": FLAGS.strategy,
        "replicas": strategy.num_replicas_in_sync,
    }


def print_table(results, float_path, qat_path):
    print()
    print(f"{'model':<26}{'test accuracy':>15}{'s / epoch':>12}")
    print(
        f"{'float':<26}{100 * results['float_accuracy']:>14.2f}%"
        f"{results['float_epoch_seconds']:>12.1f}"
    )
    label = f"QAT ({quant_flags.label()} simulated)"
    print(
        f"{label:<26}{100 * results['qat_accuracy']:>14.2f}%{results['qat_epoch_seconds']:>12.1f}"
    )
    if FLAGS.export_tflite:
        print(f"{'int8 TFLite':<26}{100 * results['tflite_accuracy']:>14.2f}%")
        print(
            f"TFLite vs Keras QAT: top-1 agreement {100 * results['top1_agreement']:.2f} %, "
            f"{100 * results['within_one_step']:.2f} % of outputs within one output step "
            f"(max {results['max_diff_steps']:.1f} steps)"
        )
        print(
            f"model size: float TFLite {results['float_tflite_bytes']} B, int8 TFLite "
            f"{results['int8_tflite_bytes']} B ({results['size_ratio']:.3f}x)"
        )
    if FLAGS.export_onnx:
        print(f"{'int8 ONNX (ONNX Runtime)':<26}{100 * results['onnx_accuracy']:>14.2f}%")
        print(
            f"ONNX vs Keras QAT: top-1 agreement {100 * results['onnx_top1_agreement']:.2f} %, "
            f"{100 * results['onnx_within_one_step']:.2f} % of outputs within one output step "
            f"(max {results['onnx_max_diff_steps']:.1f} steps); {results['int8_onnx_bytes']} B"
        )
    print(
        f"saved: {float_path}, {qat_path} ({results['replicas']} replica(s), "
        f"--strategy={results['strategy']})"
    )


if __name__ == "__main__":
    app.run(main)
