"""Inference latency and size: float TFLite vs int8 TFLite from keras-qat.

For each network a float fusion network is converted to a quantization
network (per-channel symmetric weights, the exportable settings), its ranges
are calibrated with a few training steps on random data, and both the float
model and the quantization network are converted to TFLite. Then, in one
process, rounds alternate between the two interpreters (batch 1, the same
input), for 1 and 2 threads; each round times `--invokes` calls and gives
one int8 speed-up. The table shows medians and the spread of speed-ups.

`--weight_bits 4` times 4-bit weights instead, stored as INT4 or, with
`--pack_int4=false`, as int8 tensors of the same levels (the int8 columns
are then the 4-bit model's).

Usage:
    python bench/tflite_latency.py [--rounds 7] [--invokes 200]
    python bench/tflite_latency.py --networks resnet20 --weight_bits 4 [--pack_int4=false]
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
flags.DEFINE_integer("invokes", 200, "Interpreter calls per model per round.")
flags.DEFINE_list("networks", ["lenet5", "resnet20"], "Networks to time.")
flags.DEFINE_list("threads", ["1", "2"], "Interpreter thread counts.")
flags.DEFINE_integer("weight_bits", 8, "Weight bit width of the quantized model (2 to 8).")
flags.DEFINE_bool("pack_int4", True, "Store weights of up to 4 bits as INT4 (else int8).")
flags.DEFINE_string("output", "bench/results/tflite_latency.json", "JSON output path.")
FLAGS = flags.FLAGS


def tflite_models(name):
    build, shape = models.NETWORKS[name]
    float_model = build()
    qat_model = kq.convert_quant_network(
        float_model,
        per_channel=[True, False],
        symmetric=[True, False],
        narrow_range=[True, False],
        num_bits=[FLAGS.weight_bits, 8],
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64,) + shape).astype("float32")
    qat_model.compile(
        optimizer=keras.optimizers.SGD(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    for _ in range(3):  # calibrate the ranges
        qat_model.train_on_batch(x, rng.integers(0, 10, 64))
    quantized = kq.export_tflite(qat_model, pack_int4=FLAGS.pack_int4)
    return kq.export_float_tflite(float_model), quantized, x[:1]


def time_invokes(interpreter, n):
    start = time.perf_counter()
    for _ in range(n):
        interpreter.invoke()
    return (time.perf_counter() - start) / n


def prepared(model_bytes, x, threads):
    interpreter = kq.tflite_interpreter(model_bytes, num_threads=threads)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    for _ in range(20):  # warm up
        interpreter.invoke()
    return interpreter


def measure(name):
    float_bytes, int8_bytes, x = tflite_models(name)
    rows = []
    for threads in map(int, FLAGS.threads):
        float_interpreter = prepared(float_bytes, x, threads)
        int8_interpreter = prepared(int8_bytes, x, threads)
        float_times, int8_times = [], []
        for _ in range(FLAGS.rounds):
            float_times.append(time_invokes(float_interpreter, FLAGS.invokes))
            int8_times.append(time_invokes(int8_interpreter, FLAGS.invokes))
        speedups = np.array(float_times) / np.array(int8_times)
        rows.append(
            {
                "network": name,
                "threads": threads,
                "float_us_median": 1e6 * float(np.median(float_times)),
                "int8_us_median": 1e6 * float(np.median(int8_times)),
                "speedup_median": float(np.median(speedups)),
                "speedup_min": float(speedups.min()),
                "speedup_max": float(speedups.max()),
                "float_bytes": len(float_bytes),
                "int8_bytes": len(int8_bytes),
                "weight_bits": FLAGS.weight_bits,
                "pack_int4": FLAGS.pack_int4,
            }
        )
    return rows


def main(argv):
    del argv
    rows = [row for name in FLAGS.networks for row in measure(name)]
    print(
        f"\nbatch 1, {FLAGS.rounds} rounds x {FLAGS.invokes} invokes, TF {tf.__version__}, "
        f"{os.cpu_count()} CPUs, interpreter: default delegates, weights: "
        f"{FLAGS.weight_bits} bits{' (INT4)' if FLAGS.weight_bits <= 4 and FLAGS.pack_int4 else ''}"
    )
    print(
        f"{'network':<10}{'threads':>8}{'float us':>10}{'int8 us':>9}{'speed-up':>10}"
        f"{'spread':>14}{'float KB':>10}{'int8 KB':>9}{'size':>7}"
    )
    for r in rows:
        print(
            f"{r['network']:<10}{r['threads']:>8}{r['float_us_median']:>10.1f}{r['int8_us_median']:>9.1f}"
            f"{r['speedup_median']:>9.2f}x{r['speedup_min']:>8.2f}..{r['speedup_max']:.2f}"
            f"{r['float_bytes'] / 1024:>10.1f}{r['int8_bytes'] / 1024:>9.1f}"
            f"{r['int8_bytes'] / r['float_bytes']:>6.3f}x"
        )
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump(
            {
                "tensorflow": tf.__version__,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "rounds": FLAGS.rounds,
                "invokes": FLAGS.invokes,
                "results": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
