"""Training-step cost of TensorFlow Model Optimization (tfmot) QAT models.

The baseline for bench/train_step.py: the same networks (LeNet-5 with and
without BatchNorm, ResNet-20) built with Keras 2 (tf_keras) layers, and
their QAT models from `tfmot.quantization.keras.quantize_model`. tfmot works
with Keras 2 only, so this script runs in its own virtual environment and
never imports keras_qat.

For each network, the float model and its QAT model are compiled the same
way (SGD, no XLA) and trained on the same random batch. After 5 warm-up
steps each, rounds alternate between them in one process: each round times
`--steps` `train_on_batch` calls of the float model, then of the QAT model,
and yields the mean step time of each. The table shows the ratio of the
minima over rounds (QAT ms min / float ms min) and the median of the
per-round ratios; absolute times are only context, since machines are noisy.

Usage:
    bash bench/setup_tfmot.sh
    .venv-tfmot/bin/python bench/tfmot_train_step.py [--rounds 7] [--steps 20]
"""

import json
import os
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_list("networks", ["lenet5", "lenet5_bn", "resnet20"], "Networks to time.")
flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 20, "Training steps per model per round.")
flags.DEFINE_string("output", "bench/results/train_step_tfmot.json", "JSON output path.")
flags.DEFINE_list(
    "batch_sizes",
    ["lenet5=128", "lenet5_bn=128", "resnet20=64"],
    "Batch size per network, as name=size.",
)
FLAGS = flags.FLAGS

WARMUP_STEPS = 5
NUM_CLASSES = 10


def lenet5(has_bn=False):
    """LeNet-5 (the first conv pads 28x28 like 32x32); with `has_bn=True`
    each convolution is followed by BatchNormalization and ReLU."""

    def conv_block(filters, **kwargs):
        if not has_bn:
            return [keras.layers.Conv2D(filters, 5, activation="relu", **kwargs)]
        return [
            keras.layers.Conv2D(filters, 5, **kwargs),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]

    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            *conv_block(6, padding="same"),
            keras.layers.MaxPooling2D(2),
            *conv_block(16),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(84, activation="relu"),
            keras.layers.Dense(NUM_CLASSES),
        ],
        name="lenet5_bn" if has_bn else "lenet5",
    )


def conv_bn(x, filters, kernel_size, strides=1, activation=True):
    """Conv2D -> BatchNormalization (-> ReLU)."""
    padding = "valid" if kernel_size == 1 else "same"
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding)(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.ReLU()(x) if activation else x


def resnet20(depth=20, width=16):
    """ResNet-20 (He et al. 2016, CIFAR variant): three stages of basic
    blocks with 16, 32 and 64 filters, each ending in an `Add` shortcut
    (a strided 1x1 conv and BatchNorm where the shape changes), then ReLU."""
    blocks = (depth - 2) // 6
    inputs = keras.Input((32, 32, 3))
    x = conv_bn(inputs, width, 3)
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(x, filters, 3, strides=strides)
            y = conv_bn(y, filters, 3, activation=False)
            if strides != 1 or x.shape[-1] != filters:
                x = conv_bn(x, filters, 1, strides=strides, activation=False)
            x = keras.layers.Add()([x, y])
            x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES)(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


# name -> (builder, input shape)
NETWORKS = {
    "lenet5": (lenet5, (28, 28, 1)),
    "lenet5_bn": (lambda: lenet5(has_bn=True), (28, 28, 1)),
    "resnet20": (resnet20, (32, 32, 3)),
}


def parse_batch_sizes(items):
    batch_sizes = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not size.isdigit():
            raise app.UsageError(f"Expected name=size in --batch_sizes. Received: {item!r}")
        batch_sizes[name] = int(size)
    return batch_sizes


def compiled(model):
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return model


def time_steps(model, x, y, steps):
    """Mean seconds per `train_on_batch` call over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def measure(name, batch_size):
    build, input_shape = NETWORKS[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch_size,) + input_shape).astype("float32")
    y = rng.integers(0, NUM_CLASSES, batch_size).astype("int32")
    float_model = build()
    qat_model = tfmot.quantization.keras.quantize_model(float_model)
    float_model, qat_model = compiled(float_model), compiled(qat_model)
    for model in (float_model, qat_model):  # trace and warm up
        time_steps(model, x, y, WARMUP_STEPS)
    float_times, qat_times = [], []
    for _ in range(FLAGS.rounds):
        float_times.append(time_steps(float_model, x, y, FLAGS.steps))
        qat_times.append(time_steps(qat_model, x, y, FLAGS.steps))
    float_ms, qat_ms = 1e3 * np.array(float_times), 1e3 * np.array(qat_times)
    return {
        "impl": "tfmot",
        "network": name,
        "batch_size": batch_size,
        "jit_compile": False,
        "bn_fold": None,
        "float_ms_min": float(float_ms.min()),
        "qat_ms_min": float(qat_ms.min()),
        "ratio_of_min": float(qat_ms.min() / float_ms.min()),
        "float_ms_median": float(np.median(float_ms)),
        "qat_ms_median": float(np.median(qat_ms)),
        "ratios": (qat_ms / float_ms).tolist(),
    }


def print_table(rows):
    print(
        f"\ntfmot {tfmot.__version__}, TF {tf.__version__}, tf_keras {keras.__version__}, "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps, {os.cpu_count()} CPUs"
    )
    print(
        f"{'network':<10}{'batch':>6}{'float ms min':>14}{'QAT ms min':>12}"
        f"{'QAT/float min':>15}{'median ratio':>14}"
    )
    for row in rows:
        print(
            f"{row['network']:<10}{row['batch_size']:>6}{row['float_ms_min']:>14.1f}"
            f"{row['qat_ms_min']:>12.1f}{row['ratio_of_min']:>14.2f}x"
            f"{np.median(row['ratios']):>13.2f}x"
        )


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.networks) - set(NETWORKS))
    if unknown:
        raise app.UsageError(f"Unknown networks {unknown}; choose from {sorted(NETWORKS)}.")
    batch_sizes = parse_batch_sizes(FLAGS.batch_sizes)
    missing = sorted(set(FLAGS.networks) - set(batch_sizes))
    if missing:
        raise app.UsageError(f"No batch size in --batch_sizes for {missing}.")
    rows = [measure(name, batch_sizes[name]) for name in FLAGS.networks]
    print_table(rows)
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "impl": "tfmot",
                "tensorflow": tf.__version__,
                "tf_keras": keras.__version__,
                "tfmot": tfmot.__version__,
                "cpus": os.cpu_count(),
                "rounds": FLAGS.rounds,
                "steps": FLAGS.steps,
                "results": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
