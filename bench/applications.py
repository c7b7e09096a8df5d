"""keras.applications networks through keras-qat: convert, fit, export.

For each network (weights=None, small inputs, logits output): set the
BatchNorm statistics from 64 random images (with the initial statistics the
logits hardly vary between inputs and top-1 is decided by near-ties),
convert the plain Keras model with the exportable settings (per-channel
symmetric weights), train two `fit` steps, export to int8 TFLite and compare
it with the Keras model on the 64 images. The table gives the time of each
stage, the float compute ops left (none expected), the int8 and float TFLite
sizes, and the agreement of the int8 model with the Keras model next to the
agreement of the Keras model under XLA with itself without XLA: a yardstick
for how much the network amplifies one-step rounding differences.

With --train_images N the networks are trained instead, on 32x32 RGB
Fashion-MNIST (padded, channels repeated): float for --float_epochs on N
training images, then QAT for --qat_epochs from the float weights, and the
table compares float, QAT and int8 TFLite accuracy and the TFLite / Keras
agreement on the 10k test images.

Usage:
    python bench/applications.py [--networks MobileNetV2,ResNet50,...]
    bash scripts/get_data.sh fashion_mnist
    python bench/applications.py --train_images 20000 --networks MobileNetV2,ResNet50V2
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
from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import idx_data  # noqa: E402

import keras_qat as kq  # noqa: E402
from keras_qat.export.interpreter import float_ops  # noqa: E402

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
flags.DEFINE_string(
    "output", None, "JSON output path (default: bench/results/applications[_trained].json)."
)
flags.DEFINE_integer(
    "train_images", 0, "Train on this many Fashion-MNIST images (0: untrained, random data)."
)
flags.DEFINE_string(
    "data_dir", None, "Fashion-MNIST IDX directory (default: the Debian package's)."
)
flags.DEFINE_integer("float_epochs", 3, "Float epochs with --train_images.")
flags.DEFINE_integer("qat_epochs", 1, "QAT epochs with --train_images.")
flags.DEFINE_integer("batch_size", 64, "Batch size with --train_images.")
FLAGS = flags.FLAGS


def run(name):
    size, kwargs, input_scale = NETWORKS[name]
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None, **kwargs
    )
    rng = np.random.default_rng(0)
    x = (rng.uniform(0, 1, (64, size, size, 3)) * input_scale).astype("float32")
    set_batchnorm_statistics(model, x)
    start = time.perf_counter()
    qat_model = kq.convert_quant_network(
        model, per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False]
    )
    convert_s = time.perf_counter() - start
    qat_model.compile(
        optimizer=keras.optimizers.SGD(1e-4),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    start = time.perf_counter()
    qat_model.fit(
        x[:16], keras.utils.to_categorical(rng.integers(0, 10, 16), 10), batch_size=8, verbose=0
    )
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = kq.export_tflite(qat_model, allow_float_ops=True)
    export_s = time.perf_counter() - start
    report = kq.compare_tflite(qat_model, int8, x)
    return {
        "network": name,
        **xla_yardstick(qat_model, x, report["output_scale"]),
        "input_size": size,
        "keras_layers": len(model.layers),
        "quant_layers": len(qat_model.layers),
        "convert_s": convert_s,
        "fit_2_steps_s": fit_s,
        "export_s": export_s,
        "float_ops": float_ops(int8),
        "int8_bytes": len(int8),
        "float_bytes": len(kq.export_float_tflite(model)),
        **report,
    }


def set_batchnorm_statistics(model, x):
    """Sets every BatchNorm's moving statistics to those of `x`."""
    batchnorms = [
        layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    momenta = [layer.momentum for layer in batchnorms]
    for layer in batchnorms:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(batchnorms, momenta):
        layer.momentum = momentum


def xla_yardstick(qat_model, x, output_scale):
    """How the Keras model under XLA agrees with itself without XLA (its
    fake-quant kernel rounds some float ties the other way)."""
    keras_out = qat_model.predict(x, batch_size=256, verbose=0)
    xla = tf.function(lambda batch: qat_model(batch, training=False), jit_compile=True)
    xla_out = np.concatenate([xla(x[i : i + 256]).numpy() for i in range(0, len(x), 256)])
    steps = np.abs(xla_out - keras_out) / output_scale
    return {
        "xla_top1_agreement": float(np.mean(xla_out.argmax(-1) == keras_out.argmax(-1))),
        "xla_within_one_step": float(np.mean(steps <= 1.001)),
        "xla_mean_diff_steps": float(steps.mean()),
        "xla_max_diff_steps": float(steps.max()),
    }


def fashion_mnist_rgb32(limit_train):
    """Fashion-MNIST padded to 32x32 with 3 equal channels, in [0, 1]."""
    (x_train, y_train), (x_test, y_test) = idx_data.load_for_training(
        "fashion_mnist", FLAGS.data_dir, limit_train
    )

    def rgb32(images):
        return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)

    return (rgb32(x_train), y_train), (rgb32(x_test), y_test)


def run_trained(name, data):
    _, kwargs, input_scale = NETWORKS[name]
    (x_train, y_train), (x_test, y_test) = data
    x_train, x_test = x_train * input_scale, x_test * input_scale
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None, **kwargs
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # The applications' momentum (0.99 to 0.999) suits long training;
            # in these few hundred steps the moving statistics would stay
            # near their initial values and inference would fail.
            layer.momentum = 0.9
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(network, epochs, learning_rate):
        steps = epochs * (len(x_train) // FLAGS.batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        network.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=["accuracy"])
        start = time.perf_counter()
        network.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=epochs, verbose=0)
        seconds = time.perf_counter() - start
        return network.evaluate(x_test, y_test, batch_size=256, verbose=0)[1], seconds

    float_accuracy, float_s = fit(model, FLAGS.float_epochs, 2e-3)
    qat_model = kq.convert_quant_network(
        model, per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False]
    )
    qat_accuracy, qat_s = fit(qat_model, FLAGS.qat_epochs, 1e-4)
    int8 = kq.export_tflite(qat_model)
    tflite_out, _ = kq.run_tflite(int8, x_test)
    report = kq.compare_tflite(qat_model, int8, x_test)
    return {
        "network": name,
        "train_images": len(x_train),
        "float_accuracy": float(float_accuracy),
        "qat_accuracy": float(qat_accuracy),
        "tflite_accuracy": float(np.mean(tflite_out.argmax(-1) == y_test)),
        "float_s": float_s,
        "qat_s": qat_s,
        "int8_bytes": len(int8),
        **xla_yardstick(qat_model, x_test, report["output_scale"]),
        **report,
    }


def print_trained(results):
    print(
        f"{'network':<18}{'float':>8}{'QAT':>8}{'TFLite':>8}{'TFLite vs Keras: top-1':>24}"
        f"{'<=1 step':>9}{'max':>6}{'XLA vs Keras: top-1':>21}{'<=1 step':>9}{'max':>6}"
    )
    for r in results:
        print(
            f"{r['network']:<18}{100 * r['float_accuracy']:>7.2f}%{100 * r['qat_accuracy']:>7.2f}%"
            f"{100 * r['tflite_accuracy']:>7.2f}%{100 * r['top1_agreement']:>23.2f}%"
            f"{100 * r['within_one_step']:>8.1f}%{r['max_diff_steps']:>6.0f}"
            f"{100 * r['xla_top1_agreement']:>20.2f}%{100 * r['xla_within_one_step']:>8.1f}%"
            f"{r['xla_max_diff_steps']:>6.0f}"
        )


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    keras.utils.set_random_seed(0)
    output = FLAGS.output or (
        "bench/results/applications_trained.json"
        if FLAGS.train_images
        else "bench/results/applications.json"
    )
    if FLAGS.train_images:
        data = fashion_mnist_rgb32(FLAGS.train_images)
        results = []
        for name in FLAGS.networks:
            results.append(run_trained(name, data))
            print_trained(results[-1:])
        write(output, results)
        return
    results = [run(name) for name in FLAGS.networks]
    header = (
        f"{'network':<18}{'size':>5}{'convert s':>10}{'fit s':>7}{'export s':>9}"
        f"{'float ops':>10}{'int8/float':>11}{'TFLite vs Keras: top-1':>24}{'mean steps':>11}"
        f"{'XLA vs Keras: top-1':>21}{'mean steps':>11}"
    )
    print(header)
    for r in results:
        print(
            f"{r['network']:<18}{r['input_size']:>5}{r['convert_s']:>10.1f}{r['fit_2_steps_s']:>7.1f}"
            f"{r['export_s']:>9.1f}{len(r['float_ops']):>10}"
            f"{r['int8_bytes'] / r['float_bytes']:>11.3f}"
            f"{100 * r['top1_agreement']:>23.1f}%{r['mean_abs_diff'] / r['output_scale']:>11.2f}"
            f"{100 * r['xla_top1_agreement']:>20.1f}%{r['xla_mean_diff_steps']:>11.2f}"
        )
    write(output, results)


def write(output, results):
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(
            {
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "results": results,
            },
            f,
            indent=2,
        )
    print(f"wrote {output}")


if __name__ == "__main__":
    app.run(main)
