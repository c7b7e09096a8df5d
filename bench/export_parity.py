"""TFLite and ONNX exports of the same QAT network, against the Keras model.

For each network (the float model trained or loaded as `ptq_vs_qat.py`
does, from its `--float_dir`): `convert_quant_network` (W8A8 defaults),
`calibrate`, `--qat_epochs` of QAT, then `export_tflite` and `export_onnx`.
Both integer models are run on the whole test set (TFLite's interpreter,
ONNX Runtime on CPU) and compared with the Keras QAT model: accuracy, mean
and largest difference in output steps, share of outputs within one step,
top-1 agreement on rows without a near-tie. For ONNX also what ONNX
Runtime's optimized graph runs: its integer ops (QLinear*) and any
convolution or matrix product left in float.

Usage:
    python bench/export_parity.py [--networks lenet5,resnet20,mobilenet_v2_tiny,vit]
Flags of `ptq_vs_qat.py` (`--float_dir`, `--limit_train`, `--qat_epochs`,
data directories) apply.
"""

import collections
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ptq_vs_qat  # noqa: E402  (its flags and float models)
from results_file import write_results  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_string(
    "parity_output", os.path.join(HERE, "results", "export_parity.json"), "JSON path."
)
FLAGS = flags.FLAGS
_FLOAT_COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# ONNX Runtime's integer kernels: QLinearConv, QLinearMatMul, QGemm, ...
_INTEGER_OPS = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger")


def onnx_runtime_ops(onnx_bytes):
    """The op types of ONNX Runtime's optimized graph, counted."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as directory:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
        ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def summary(report, outputs, y):
    return {
        "accuracy": float(np.mean(outputs.argmax(-1) == y)),
        "mean_diff_steps": report["mean_abs_diff"] / report["output_scale"],
        "max_diff_steps": report["max_diff_steps"],
        "within_one_step": report["within_one_step"],
        "top1_agreement": report["top1_agreement"],
        "top1_agreement_unambiguous": report["top1_agreement_unambiguous"],
    }


def measure(name):
    dataset = ptq_vs_qat.NETWORKS[name][1]
    data_dir = FLAGS.mnist_dir if dataset == "mnist" else FLAGS.fashion_mnist_dir
    train, (x_test, y_test) = ptq_vs_qat.idx_data.load_for_training(
        dataset, data_dir, FLAGS.limit_train
    )
    if FLAGS.limit_test:
        x_test, y_test = x_test[: FLAGS.limit_test], y_test[: FLAGS.limit_test]
    images = train[0][np.random.default_rng(FLAGS.seed).permutation(len(train[0]))]
    model = ptq_vs_qat.float_model(name, train)
    qat_model = kq.convert_quant_network(model)
    kq.calibrate(qat_model, images[: FLAGS.calibration], batch_size=FLAGS.batch_size, verbose=0)
    steps = FLAGS.qat_epochs * -(-len(train[0]) // FLAGS.batch_size)
    ptq_vs_qat.compile_for(qat_model, FLAGS.qat_lr, steps)
    qat_model.fit(*train, epochs=FLAGS.qat_epochs, batch_size=FLAGS.batch_size, verbose=2)
    _, keras_accuracy = qat_model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    row = {"network": name, "keras_accuracy": float(keras_accuracy)}
    tflite_bytes = kq.export_tflite(qat_model)
    outputs, _ = kq.run_tflite(tflite_bytes, x_test)
    row["tflite"] = summary(kq.compare_tflite(qat_model, tflite_bytes, x_test), outputs, y_test)
    started = time.time()
    onnx_bytes = kq.export_onnx(qat_model)
    row["onnx_export_seconds"] = round(time.time() - started, 1)
    outputs, _ = kq.run_onnx(onnx_bytes, x_test)
    row["onnx"] = summary(kq.compare_onnx(qat_model, onnx_bytes, x_test), outputs, y_test)
    ops = onnx_runtime_ops(onnx_bytes)
    integer = {op: n for op, n in sorted(ops.items()) if op.startswith(_INTEGER_OPS)}
    row["onnx"]["integer_ops"] = integer
    row["onnx"]["float_compute_ops"] = {op: ops[op] for op in _FLOAT_COMPUTE if ops[op]}
    row["onnx"]["bytes"], row["tflite_bytes"] = len(onnx_bytes), len(tflite_bytes)
    return row


HEADER = (
    f"{'network':<18} {'format':<7} {'accuracy':>9} {'mean steps':>11} {'max':>5} "
    f"{'<=1 step':>9} {'top-1 (clear)':>14}"
)


def print_rows(row):
    for fmt in ("tflite", "onnx"):
        r = row[fmt]
        print(
            f"{row['network']:<18} {fmt:<7} {100 * r['accuracy']:>8.2f}% "
            f"{r['mean_diff_steps']:>11.4f} {r['max_diff_steps']:>5.1f} "
            f"{100 * r['within_one_step']:>8.2f}% {100 * r['top1_agreement_unambiguous']:>13.2f}%",
            flush=True,
        )
    onnx = row["onnx"]
    print(
        f"{'':<18} ONNX Runtime integer ops {onnx['integer_ops']}, float compute ops "
        f"{onnx['float_compute_ops'] or 'none'}; Keras QAT {100 * row['keras_accuracy']:.2f}%"
    )


def main(argv):
    del argv
    rows = []
    print(HEADER)
    for name in FLAGS.networks:
        rows.append(measure(name))
        print_rows(rows[-1])
    print("\n" + HEADER)
    for row in rows:
        print_rows(row)
    flag_values = {k: FLAGS[k].value for k in ("qat_epochs", "qat_lr", "calibration")}
    write_results(FLAGS.parity_output, flag_values, rows, limit_train=FLAGS.limit_train)


if __name__ == "__main__":
    app.run(main)
