"""keras.applications networks through keras-qat: convert, fit, export.

For each network (weights=None, small inputs, logits output): convert the
plain Keras model with the exportable settings (per-channel symmetric
weights), train two `fit` steps on random images, export to int8 TFLite
and compare it with the Keras model on 64 random images. The table gives
the time of each stage, the float compute ops left (none expected), the
int8 and float TFLite sizes and the agreement.

Usage:
    python bench/applications.py [--networks MobileNetV2,ResNet50,...]
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_qat as kq  # noqa: E402
from keras_qat.export import float_ops  # noqa: E402

# name -> (input size, constructor arguments, input scale)
NETWORKS = {
    "MobileNetV2": (96, dict(alpha=0.35), 1.0),
    "ResNet50": (64, {}, 1.0),
    "ResNet50V2": (64, {}, 1.0),
    "MobileNetV3Small": (64, {}, 255.0),
    "EfficientNetB0": (64, {}, 255.0),
    "DenseNet121": (64, {}, 1.0),
    "Xception": (71, {}, 1.0),
}

flags.DEFINE_list("networks", list(NETWORKS), "keras.applications networks to run.")
flags.DEFINE_string("output", "bench/results/applications.json", "JSON output path.")
FLAGS = flags.FLAGS


def run(name):
    size, kwargs, input_scale = NETWORKS[name]
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None, **kwargs
    )
    rng = np.random.default_rng(0)
    x = (rng.uniform(0, 1, (64, size, size, 3)) * input_scale).astype("float32")
    start = time.perf_counter()
    qmodel = kq.convert_quant_network(
        model, per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False]
    )
    convert_s = time.perf_counter() - start
    qmodel.compile(optimizer=keras.optimizers.SGD(1e-4),
                   loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    qmodel.fit(x[:16], keras.utils.to_categorical(rng.integers(0, 10, 16), 10), batch_size=8, verbose=0)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = kq.export_tflite(qmodel, allow_float_ops=True)
    export_s = time.perf_counter() - start
    report = kq.compare_tflite(qmodel, int8, x)
    return {
        "network": name,
        "input_size": size,
        "keras_layers": len(model.layers),
        "quant_layers": len(qmodel.layers),
        "convert_s": convert_s,
        "fit_2_steps_s": fit_s,
        "export_s": export_s,
        "float_ops": float_ops(int8),
        "int8_bytes": len(int8),
        "float_bytes": len(kq.export_float_tflite(model)),
        **report,
    }


def main(argv):
    del argv
    results = [run(name) for name in FLAGS.networks]
    header = (f"{'network':<18}{'size':>5}{'convert s':>10}{'fit s':>7}{'export s':>9}"
              f"{'float ops':>10}{'int8/float':>11}{'top-1':>8}{'<=1 step':>9}{'max steps':>10}")
    print(header)
    for r in results:
        print(f"{r['network']:<18}{r['input_size']:>5}{r['convert_s']:>10.1f}{r['fit_2_steps_s']:>7.1f}"
              f"{r['export_s']:>9.1f}{len(r['float_ops']):>10}{r['int8_bytes'] / r['float_bytes']:>11.3f}"
              f"{100 * r['top1_agreement']:>7.1f}%{100 * r['within_one_step']:>8.1f}%{r['max_diff_steps']:>10.1f}")
    os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    with open(FLAGS.output, "w") as f:
        json.dump({"tensorflow": tf.__version__, "keras": keras.__version__,
                   "machine": platform.machine(), "cpus": os.cpu_count(), "results": results}, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
