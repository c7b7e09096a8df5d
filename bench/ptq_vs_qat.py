"""What QAT buys over post-training quantization (PTQ).

For each network, one float model is trained (or loaded from
`--float_dir`), and the int8 TFLite models made from it are evaluated on the
same test set:

- `converter PTQ`: the TFLite converter's full-int8 post-training
  quantization of the float model, with `--calibration` training images as
  its representative dataset (what a user would do without keras-qat);
- `kq calibrate`: `convert_quant_network`, then `calibrate` on the same
  images (min / max), then `export_tflite`: PTQ through keras-qat's
  placement;
- `kq QAT`: `convert_quant_network`, `calibrate` (ranges start from the
  data), then `--qat_epochs` of QAT, then `export_tflite`.

At W8A8 and at 4-bit weights (W4A8; the converter has no 4-bit weight PTQ,
so `kq calibrate` is the PTQ baseline there). QAT's recovery is the
fraction of PTQ's accuracy loss that QAT wins back:
`(QAT - PTQ) / (float - PTQ)`, shown where PTQ loses more than 0.1 points
(the target: at least 80 % where it loses more than 0.5).

Usage:
    python bench/ptq_vs_qat.py [--networks lenet5,mobilenet_v2_tiny] [--limit_train 0]
Data: MNIST (`bash scripts/get_data.sh mnist`) for LeNet-5, Fashion-MNIST
(the Debian package `dataset-fashion-mnist`) for the others, or
`--mnist_dir` / `--fashion_mnist_dir`.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import idx_data  # noqa: E402
import models  # noqa: E402
from results_file import write_results  # noqa: E402

import keras_qat as kq  # noqa: E402

# name -> (builder on 28x28x1 images, data set, float epochs, float learning rate)
NETWORKS = {
    "lenet5": (models.lenet5, "mnist", 4, 1e-3),
    "mobilenet_v2_tiny": (models.mobilenet_v2_tiny, "fashion_mnist", 6, 2e-3),
    "resnet20": (lambda: models.resnet20((28, 28, 1)), "fashion_mnist", 6, 2e-3),
    "vit": (models.vit, "mnist", 5, 2e-3),
}

flags.DEFINE_list("networks", ["lenet5", "mobilenet_v2_tiny"], f"Of {sorted(NETWORKS)}.")
flags.DEFINE_list("weight_bits", ["8", "4"], "Weight bit widths (activations: 8 bits).")
flags.DEFINE_integer("qat_epochs", 1, "QAT epochs.")
flags.DEFINE_float("qat_lr", 1e-4, "Adam learning rate of QAT (cosine decay).")
flags.DEFINE_integer("calibration", 1000, "Training images used to calibrate (both PTQs).")
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_integer("limit_train", 0, "Use only this many training images (0: all).")
flags.DEFINE_integer("limit_test", 0, "Evaluate on this many test images (0: all).")
flags.DEFINE_string("float_dir", "runs/ptq_vs_qat", "Where float models are kept and reused.")
flags.DEFINE_string("mnist_dir", None, "MNIST IDX files; default: data/mnist.")
flags.DEFINE_string("fashion_mnist_dir", None, "Fashion-MNIST IDX files; default: Debian's.")
flags.DEFINE_string("output", os.path.join(HERE, "results", "ptq_vs_qat.json"), "JSON path.")
flags.DEFINE_integer("seed", 1, "Random seed.")
FLAGS = flags.FLAGS


def compile_for(model, learning_rate, steps):
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1))
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def float_model(name, train):
    """The trained float network, from `--float_dir` if it was trained before
    with the same training-set size."""
    build, _, epochs, learning_rate = NETWORKS[name]
    path = os.path.join(FLAGS.float_dir, f"{name}_{len(train[0])}.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    keras.utils.set_random_seed(FLAGS.seed)
    model = build()
    compile_for(model, learning_rate, epochs * -(-len(train[0]) // FLAGS.batch_size))
    model.fit(*train, epochs=epochs, batch_size=FLAGS.batch_size, verbose=2)
    os.makedirs(FLAGS.float_dir, exist_ok=True)
    model.save(path)
    return model


def tflite_accuracy(tflite_bytes, x, y):
    outputs, _ = kq.run_tflite(tflite_bytes, x)
    return float(np.mean(np.argmax(outputs, -1) == y))


def converter_ptq(model, images):
    def representative():
        for image in images:
            yield [image[None]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def quantized(model, weight_bits, images, train=None):
    """keras-qat's int8 model: calibrated, then (with `train`) QAT-trained."""
    qat_model = kq.convert_quant_network(model, num_bits=(weight_bits, 8))
    kq.calibrate(qat_model, images, batch_size=FLAGS.batch_size, verbose=0)
    if train is not None:
        steps = FLAGS.qat_epochs * -(-len(train[0]) // FLAGS.batch_size)
        compile_for(qat_model, FLAGS.qat_lr, steps)
        qat_model.fit(*train, epochs=FLAGS.qat_epochs, batch_size=FLAGS.batch_size, verbose=2)
    return kq.export_tflite(qat_model)


def measure(name):
    dataset = NETWORKS[name][1]
    data_dir = FLAGS.mnist_dir if dataset == "mnist" else FLAGS.fashion_mnist_dir
    train, (x_test, y_test) = idx_data.load_for_training(dataset, data_dir, FLAGS.limit_train)
    if FLAGS.limit_test:
        x_test, y_test = x_test[: FLAGS.limit_test], y_test[: FLAGS.limit_test]
    images = train[0][np.random.default_rng(FLAGS.seed).permutation(len(train[0]))]
    images = images[: FLAGS.calibration]
    model = float_model(name, train)
    _, float_accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    rows = []
    for bits in (int(b) for b in FLAGS.weight_bits):
        started = time.time()
        row = {"network": name, "weights": bits, "float": float(float_accuracy)}
        if bits == 8:
            row["converter_ptq"] = tflite_accuracy(converter_ptq(model, images), x_test, y_test)
        row["kq_calibrate"] = tflite_accuracy(quantized(model, bits, images), x_test, y_test)
        row["kq_qat"] = tflite_accuracy(quantized(model, bits, images, train), x_test, y_test)
        row["seconds"] = round(time.time() - started, 1)
        rows.append(with_recovery(row))
        print_row(rows[-1])
    return rows


def with_recovery(row):
    """`recovery`: the fraction of PTQ's loss that QAT wins back, where the
    PTQ (the converter's at 8 bits, keras-qat's calibration at 4) loses
    more than 0.1 points (less is within the noise of one training run)."""
    ptq = row.get("converter_ptq", row["kq_calibrate"])
    loss = row["float"] - ptq
    row["recovery"] = (row["kq_qat"] - ptq) / loss if loss > 0.001 else None
    return row


HEADER = (
    f"{'network':<20} {'W':>2} {'float':>7} {'conv PTQ':>9} {'kq PTQ':>7} "
    f"{'kq QAT':>7} {'recovery':>9}"
)


def print_row(row):
    def percent(key):
        value = row.get(key)
        return "-" if value is None else f"{100 * value:.2f}"

    recovery = "-" if row["recovery"] is None else f"{100 * row['recovery']:.0f} %"
    print(
        f"{row['network']:<20} {row['weights']:>2} {percent('float'):>7} "
        f"{percent('converter_ptq'):>9} {percent('kq_calibrate'):>7} {percent('kq_qat'):>7} "
        f"{recovery:>9}",
        flush=True,
    )


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.networks) - set(NETWORKS))
    if unknown:
        raise ValueError(f"Unknown networks {unknown}; known: {sorted(NETWORKS)}")
    rows = []
    print(HEADER)
    for name in FLAGS.networks:
        rows += measure(name)
    print("\n" + HEADER)
    for row in rows:
        print_row(row)
    flag_values = {k: FLAGS[k].value for k in ("qat_epochs", "qat_lr", "calibration")}
    write_results(FLAGS.output, flag_values, rows, limit_train=FLAGS.limit_train)


if __name__ == "__main__":
    app.run(main)
