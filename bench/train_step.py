"""Training-step cost of a quantization network relative to its float model.

Networks with BatchNorm are timed with bn_fold=True (folded layers compute
the float conv a second time for batch statistics) and bn_fold=False.

For each network, the float model and its quantization network (quant delay
passed, so every fake-quant op runs) are compiled the same way and trained
on the same batch. After warm-up, rounds alternate between them in one
process: each round times `--steps` steps of the float model, then of the
QAT model, and yields one ratio. The table shows the median ratio and its
spread (min..max over rounds); absolute times are shown only for context,
since the machines are shared and noisy.

Usage:
    python bench/train_step.py [--rounds 7] [--steps 20] [--jit_compile both]
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import models  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 20, "Training steps per model per round.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_enum("jit_compile", "off", ["off", "on", "both"], "XLA compilation of the train step.")
flags.DEFINE_list("networks", ["lenet5", "resnet20"], "Networks to time.")
flags.DEFINE_list(
    "bn_fold", ["true", "false"], "bn_fold values to time (networks with BatchNorm only)."
)
flags.DEFINE_string("output", "bench/results/train_step.json", "JSON output path.")
FLAGS = flags.FLAGS


def compiled(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def time_steps(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def measure(name, jit_compile, bn_fold):
    build, shape = models.NETWORKS[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (FLAGS.batch_size,) + shape).astype("float32")
    y = rng.integers(0, 10, FLAGS.batch_size).astype("int32")
    float_model = build()
    qat_model = kq.convert_quant_network(
        float_model, quant_delay=0, bn_fold=bn_fold, per_channel=[True, False]
    )
    float_model, qat_model = compiled(float_model, jit_compile), compiled(qat_model, jit_compile)
    for model in (float_model, qat_model):  # trace, compile, warm up
        time_steps(model, x, y, 5)
    float_times, qat_times = [], []
    for _ in range(FLAGS.rounds):
        float_times.append(time_steps(float_model, x, y, FLAGS.steps))
        qat_times.append(time_steps(qat_model, x, y, FLAGS.steps))
    ratios = np.array(qat_times) / np.array(float_times)
    return {
        "network": name,
        "jit_compile": jit_compile,
        "bn_fold": bn_fold,
        "float_ms_median": 1e3 * float(np.median(float_times)),
        "qat_ms_median": 1e3 * float(np.median(qat_times)),
        "ratio_median": float(np.median(ratios)),
        "ratio_min": float(ratios.min()),
        "ratio_max": float(ratios.max()),
        "ratios": ratios.tolist(),
    }


def main(argv):
    del argv
    modes = {"off": [False], "on": [True], "both": [False, True]}[FLAGS.jit_compile]
    folds = [value.lower() == "true" for value in FLAGS.bn_fold]
    rows = []
    for name in FLAGS.networks:
        has_bn = any(getattr(layer, "has_bn", False) for layer in models.NETWORKS[name][0]().layers)
        for bn_fold in folds if has_bn else folds[:1]:
            rows += [measure(name, jit, bn_fold) for jit in modes]
    print(
        f"\nbatch {FLAGS.batch_size}, {FLAGS.rounds} rounds x {FLAGS.steps} steps, "
        f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'network':<10}{'bn_fold':>8}{'XLA':>5}{'float ms':>10}{'QAT ms':>9}"
        f"{'QAT/float':>11}{'spread':>15}"
    )
    for r in rows:
        print(
            f"{r['network']:<10}{str(r['bn_fold']):>8}{'on' if r['jit_compile'] else 'off':>5}"
            f"{r['float_ms_median']:>10.1f}"
            f"{r['qat_ms_median']:>9.1f}{r['ratio_median']:>10.2f}x"
            f"{r['ratio_min']:>8.2f}..{r['ratio_max']:.2f}"
        )
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "batch_size": FLAGS.batch_size,
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
