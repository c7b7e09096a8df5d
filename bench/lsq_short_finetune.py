"""Learned ranges (LSQ) against min / max ranges in a short fine-tune.

For each network and seed: a float model trained for `--float_epochs`, then
one QAT epoch (`--qat_epochs`, Adam `--qat_lr`) at `--num_bits` from that
same float model, once with min / max ranges and once with learned ranges
per `--step_rates` (`keras_qat.layers.learned_range`: how many times the
learning rate the log-step moves per update). Test accuracy of the Keras
QAT model (the int8-simulated one), and the QAT epoch's time.

Usage:
    python bench/lsq_short_finetune.py [--networks small_cnn,lenet5_bn] [--seeds 1,2]
Data: MNIST (`bash scripts/get_data.sh mnist`) or `--mnist_dir`.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import idx_data  # noqa: E402
import models  # noqa: E402
from results_file import write_results  # noqa: E402

import keras_qat as kq  # noqa: E402
from keras_qat.layers import learned_range  # noqa: E402

L = keras.layers


def small_cnn():
    """Two conv-BatchNorm-ReLU with max pooling, Dense(64, relu), Dense(10)."""
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (16, 32):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.MaxPooling2D()(L.ReLU()(L.BatchNormalization()(x)))
    x = L.Dense(64, activation="relu")(L.Flatten()(x))
    return keras.Model(inputs, L.Dense(10)(x))


NETWORKS = {"small_cnn": small_cnn, "lenet5_bn": lambda: models.lenet5(has_bn=True)}

flags.DEFINE_list("networks", sorted(NETWORKS), f"Of {sorted(NETWORKS)}.")
flags.DEFINE_list("seeds", ["1", "2"], "Random seeds.")
flags.DEFINE_list("step_rates", ["1", "3"], "Learned ranges' step rates to measure.")
flags.DEFINE_list("num_bits", ["4", "4"], "Weight and activation bits.")
flags.DEFINE_integer("float_epochs", 2, "Float training epochs (Adam 1e-3).")
flags.DEFINE_integer("qat_epochs", 1, "QAT epochs.")
flags.DEFINE_float("qat_lr", 3e-4, "Adam learning rate of QAT (constant).")
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_integer("limit_train", 0, "Use only this many training images (0: all).")
flags.DEFINE_string("mnist_dir", None, "MNIST IDX files; default: data/mnist.")
flags.DEFINE_string(
    "output", os.path.join(HERE, "results", "lsq_short_finetune.json"), "JSON path."
)
FLAGS = flags.FLAGS


def compiled(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def qat_accuracy(float_model, data, step_rate, seed):
    """Test accuracy after QAT from `float_model` (min / max ranges when
    `step_rate` is None), and the seconds QAT took."""
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    learned_range.DEFAULT_STEP_RATE = step_rate or 1.0
    bits = tuple(int(b) for b in FLAGS.num_bits)
    qat_model = kq.convert_quant_network(
        float_model, num_bits=bits, range_learning=step_rate is not None
    )
    compiled(qat_model, FLAGS.qat_lr)
    started = time.time()
    qat_model.fit(x_train, y_train, epochs=FLAGS.qat_epochs, batch_size=FLAGS.batch_size, verbose=0)
    seconds = time.time() - started
    _, accuracy = qat_model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return float(accuracy), round(seconds, 1)


def measure(name, seed, data):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    float_model = compiled(NETWORKS[name](), 1e-3)
    float_model.fit(
        x_train, y_train, epochs=FLAGS.float_epochs, batch_size=FLAGS.batch_size, verbose=0
    )
    _, float_accuracy = float_model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    row = {"network": name, "seed": seed, "float": float(float_accuracy)}
    row["min_max"], row["min_max_seconds"] = qat_accuracy(float_model, data, None, seed)
    for rate in FLAGS.step_rates:
        key = f"lsq_rate_{rate}"
        row[key], row[key + "_seconds"] = qat_accuracy(float_model, data, float(rate), seed)
    return row


def print_row(row):
    cells = [f"{100 * row[key]:.2f}" for key in ["float", "min_max"] + _lsq_keys()]
    print(f"{row['network']:<12} {row['seed']:>4} " + " ".join(f"{c:>12}" for c in cells))


def _lsq_keys():
    return [f"lsq_rate_{rate}" for rate in FLAGS.step_rates]


def main(argv):
    del argv
    data = idx_data.load_for_training("mnist", FLAGS.mnist_dir, FLAGS.limit_train)
    header = ["float", "min/max"] + [f"LSQ rate {r}" for r in FLAGS.step_rates]
    print(f"{'network':<12} {'seed':>4} " + " ".join(f"{h:>12}" for h in header))
    rows = []
    for name in FLAGS.networks:
        for seed in (int(s) for s in FLAGS.seeds):
            rows.append(measure(name, seed, data))
            print_row(rows[-1])
    keys = ("num_bits", "float_epochs", "qat_epochs", "qat_lr", "batch_size")
    write_results(FLAGS.output, {k: FLAGS[k].value for k in keys}, rows)


if __name__ == "__main__":
    app.run(main)
