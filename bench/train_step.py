"""Training-step cost of a quantization network relative to its float model.

For each network (LeNet-5 without and with BatchNorm, ResNet-20), XLA mode
and `bn_fold` value, the float model and its quantization network (quant
delay passed, so every fake-quant op runs) are compiled the same way and
trained on the same batch. After warm-up, rounds alternate between them in
one process: each round times `--steps` steps of the float model, then of
the QAT model. The table shows the ratio of the *minimum* step times over
the rounds (the machines are shared and noisy: the minimum is the least
disturbed), and the median ratio of the rounds for context.

Peak memory of a training step is measured in separate processes, one per
model: TensorFlow's CPU allocator peak over a few steps after warm-up
(`tf.config.experimental.get_memory_info`, with TensorFlow's BFC allocator on
the CPU), and the process's peak RSS (mostly TensorFlow itself). The peak
depends on the order in which TensorFlow's executor happens to run
independent ops (ResNet-20's moved by up to 10 % between processes), so each
model is probed `--memory_probes` times and the minimum is reported, as for
step times.

With `--impl tfmot` (or `both`) the same networks are timed with TensorFlow
Model Optimization on Keras 2, by `bench/tfmot_train_step.py` in its own
virtual environment (`bash bench/setup_tfmot.sh` creates `.venv-tfmot`).

With `--ranges minmax,learned` keras-qat's rows come in pairs: min / max
ranges, then learned ranges (LSQ, `range_learning=True`).

Usage:
    python bench/train_step.py [--jit_compile both] [--impl both] [--rounds 60]
        [--ranges minmax,learned]
"""

import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import models  # noqa: E402

import keras_qat as kq  # noqa: E402

BATCH_SIZES = {"lenet5": 128, "lenet5_bn": 128, "resnet20": 64}

flags.DEFINE_integer("rounds", 60, "Interleaved timing rounds.")
flags.DEFINE_integer("steps", 1, "Training steps per model per round.")
flags.DEFINE_enum("jit_compile", "both", ["off", "on", "both"], "XLA compilation of the step.")
flags.DEFINE_list("networks", ["lenet5", "lenet5_bn", "resnet20"], "Networks to time.")
flags.DEFINE_list("bn_fold", ["true", "false"], "bn_fold values (networks with BatchNorm only).")
flags.DEFINE_enum("impl", "keras_qat", ["keras_qat", "tfmot", "both"], "Which tools to time.")
flags.DEFINE_list(
    "ranges", ["minmax"], "Range kinds of keras-qat: minmax (moving min / max), learned (LSQ)."
)
flags.DEFINE_bool("memory", True, "Also measure peak memory in separate processes.")
flags.DEFINE_integer("memory_probes", 3, "Processes per model for peak memory (minimum kept).")
flags.DEFINE_string("tfmot_python", ".venv-tfmot/bin/python", "Python of the tfmot venv.")
flags.DEFINE_string("probe", None, "Internal: measure one model's memory (network:kind:jit).")
flags.DEFINE_string("output", "bench/results/train_step.json", "JSON output path.")
FLAGS = flags.FLAGS


def batch(name):
    _, shape = models.NETWORKS[name]
    rng = np.random.default_rng(0)
    size = BATCH_SIZES[name]
    x = rng.uniform(0, 1, (size,) + shape).astype("float32")
    return x, rng.integers(0, 10, size).astype("int32")


def build(name, kind):
    """`kind`: "float", "qat_fold" or "qat_nofold", with "_lsq" for learned
    ranges."""
    model = models.NETWORKS[name][0]()
    if kind == "float":
        return model
    return kq.convert_quant_network(
        model,
        quant_delay=0,
        bn_fold=kind.startswith("qat_fold"),
        per_channel=[True, False],
        range_learning=kind.endswith("_lsq"),
    )


def compiled(model, jit_compile):
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def step_time(model, x, y, steps):
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def measure(name, jit_compile, kind):
    x, y = batch(name)
    float_model = compiled(build(name, "float"), jit_compile)
    qat_model = compiled(build(name, kind), jit_compile)
    for model in (float_model, qat_model):  # trace, compile, warm up
        step_time(model, x, y, 5)
    float_times, qat_times = [], []
    for _ in range(FLAGS.rounds):
        float_times.append(step_time(float_model, x, y, FLAGS.steps))
        qat_times.append(step_time(qat_model, x, y, FLAGS.steps))
    ratios = np.array(qat_times) / np.array(float_times)
    return {
        "impl": "keras_qat",
        "network": name,
        "batch_size": len(x),
        "jit_compile": jit_compile,
        "bn_fold": None if kind == "float" else kind.startswith("qat_fold"),
        "ranges": "learned" if kind.endswith("_lsq") else "minmax",
        "float_ms_min": 1e3 * min(float_times),
        "qat_ms_min": 1e3 * min(qat_times),
        "ratio_of_min": min(qat_times) / min(float_times),
        "float_ms_median": 1e3 * float(np.median(float_times)),
        "qat_ms_median": 1e3 * float(np.median(qat_times)),
        "ratio_median": float(np.median(ratios)),
        "ratios": ratios.tolist(),
    }


def probe_memory(spec):
    """In a fresh process: peak allocator bytes and RSS of training steps."""
    name, kind, jit = spec.split(":")
    x, y = batch(name)
    model = compiled(build(name, kind), jit == "on")
    step_time(model, x, y, 3)
    tf.config.experimental.reset_memory_stats("CPU:0")
    step_time(model, x, y, 3)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"allocator_peak_bytes": peak, "peak_rss_bytes": rss_kb * 1024}))


@functools.lru_cache(maxsize=None)
def memory(name, kind, jit_compile):
    """The minimum over `--memory_probes` processes of each peak, and all probes."""
    spec = f"{name}:{kind}:{'on' if jit_compile else 'off'}"
    # TensorFlow keeps allocator statistics on the CPU only with its BFC allocator.
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    probes = []
    for _ in range(FLAGS.memory_probes):
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--probe={spec}"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        probes.append(json.loads(result.stdout.strip().splitlines()[-1]))
    best = {key: min(probe[key] for probe in probes) for key in probes[0]}
    return dict(best, probes=probes)


def add_memory(row):
    kind = "qat_fold" if row["bn_fold"] in (None, True) else "qat_nofold"
    kind += "_lsq" if row.get("ranges") == "learned" else ""
    float_memory = memory(row["network"], "float", row["jit_compile"])
    qat_memory = memory(row["network"], kind, row["jit_compile"])
    for key in ("allocator_peak_bytes", "peak_rss_bytes", "probes"):
        row[f"float_{key}"], row[f"qat_{key}"] = float_memory[key], qat_memory[key]
    row["allocator_peak_ratio"] = qat_memory["allocator_peak_bytes"] / max(
        float_memory["allocator_peak_bytes"], 1
    )
    row["peak_rss_ratio"] = qat_memory["peak_rss_bytes"] / float_memory["peak_rss_bytes"]
    return row


def tfmot_rows():
    python = os.path.abspath(FLAGS.tfmot_python)
    if not os.path.exists(python):
        raise SystemExit(
            f"--impl tfmot needs {FLAGS.tfmot_python}: run `bash bench/setup_tfmot.sh` first."
        )
    output = os.path.join(os.path.dirname(FLAGS.output) or ".", "train_step_tfmot.json")
    subprocess.run(
        [
            python,
            os.path.join(HERE, "tfmot_train_step.py"),
            f"--networks={','.join(FLAGS.networks)}",
            f"--rounds={FLAGS.rounds}",
            f"--steps={FLAGS.steps}",
            f"--output={output}",
        ],
        check=True,
    )
    with open(output) as f:
        rows = json.load(f)["results"]
    for row in rows:
        row["ratio_median"] = float(np.median(row["ratios"]))
    return rows


_RANGE_SUFFIX = {"minmax": "", "learned": "_lsq"}


def keras_qat_rows():
    modes = {"off": [False], "on": [True], "both": [False, True]}[FLAGS.jit_compile]
    folds = [value.lower() == "true" for value in FLAGS.bn_fold]
    unknown = sorted(set(FLAGS.ranges) - set(_RANGE_SUFFIX))
    if unknown:
        raise app.UsageError(f"--ranges takes minmax and / or learned. Received: {unknown}")
    rows = []
    for name in FLAGS.networks:
        has_bn = any(getattr(layer, "has_bn", False) for layer in build(name, "float").layers)
        for bn_fold in folds if has_bn else [True]:
            for ranges in FLAGS.ranges:
                kind = ("qat_fold" if bn_fold else "qat_nofold") + _RANGE_SUFFIX[ranges]
                for jit in modes:
                    row = measure(name, jit, kind)
                    row["bn_fold"] = bn_fold if has_bn else None
                    rows.append(add_memory(row) if FLAGS.memory else row)
                    print_rows(rows[-1:])
    return rows


def print_rows(rows):
    for r in rows:
        fold = "-" if r["bn_fold"] is None else str(r["bn_fold"])
        fold += " LSQ" if r.get("ranges") == "learned" else ""
        memory_ratio = r.get("allocator_peak_ratio")
        memory_text = "" if memory_ratio is None else f"{memory_ratio:>9.2f}x"
        print(
            f"{r['impl']:<10}{r['network']:<10}{r['batch_size']:>6}{fold:>9}"
            f"{'on' if r['jit_compile'] else 'off':>5}{r['float_ms_min']:>10.1f}"
            f"{r['qat_ms_min']:>9.1f}{r['ratio_of_min']:>10.2f}x{r['ratio_median']:>10.2f}x"
            f"{memory_text}",
            flush=True,
        )


def main(argv):
    del argv
    if FLAGS.probe:
        return probe_memory(FLAGS.probe)
    print(
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps, TF {tf.__version__}, "
        f"Keras {keras.__version__}, {os.cpu_count()} CPUs\n"
        f"{'impl':<10}{'network':<10}{'batch':>6}{'bn_fold':>9}{'XLA':>5}{'float ms':>10}"
        f"{'QAT ms':>9}{'QAT/float':>11}{'(median)':>11}{'memory':>10}"
    )
    rows = []
    if FLAGS.impl in ("keras_qat", "both"):
        rows += keras_qat_rows()
    if FLAGS.impl in ("tfmot", "both"):
        tfmot = tfmot_rows()
        print_rows(tfmot)
        rows += tfmot
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "machine": platform.machine(),
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
