"""A small U-Net on Fashion-MNIST segmentation masks: float, QAT, int8 TFLite.

The task is dense prediction built from Fashion-MNIST: every pixel of an
image gets one of 11 classes, background (pixel value <= --threshold) or the
class of the garment it belongs to. A pixel's class needs the whole
garment's shape, so the network needs both its encoder's context and its
decoder's resolution.

1. Train a U-Net (Conv2D-BatchNorm-ReLU encoder with max pooling; a
   decoder with a strided Conv2DTranspose, an UpSampling2D and Concatenate
   skips) in float.
2. Convert it with `convert_quant_network` (defaults) and QAT-train it.
3. Export an int8 TFLite model and evaluate all three on the test set:
   pixel accuracy and mean IoU over the 11 classes, and the TFLite model's
   per-pixel agreement with the Keras QAT model.

Data: Fashion-MNIST IDX files, by default from the Debian package
dataset-fashion-mnist (`bash scripts/get_data.sh fashion_mnist`), or
`--data_dir`.

Usage:
    python examples/unet_quant.py [--float_epochs 3] [--qat_epochs 1]
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idx_data  # noqa: E402
import one_trace  # noqa: E402

import keras_qat as kq  # noqa: E402

flags.DEFINE_string(
    "data_dir", None, "Directory with the Fashion-MNIST IDX files; default: the Debian package's."
)
flags.DEFINE_string("output_dir", "runs/unet", "Where models and results are written.")
flags.DEFINE_integer("float_epochs", 3, "Float training epochs.")
flags.DEFINE_integer("qat_epochs", 1, "QAT epochs.")
flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
flags.DEFINE_float("float_lr", 2e-3, "Adam learning rate of float training (cosine decay).")
flags.DEFINE_float("qat_lr", 2e-4, "Adam learning rate of QAT (cosine decay).")
flags.DEFINE_integer("quant_delay", 100, "Training steps before fake quantization starts.")
flags.DEFINE_integer(
    "freeze_bn", 500, "Training step from which folded BatchNorm statistics freeze."
)
flags.DEFINE_float("threshold", 0.2, "Pixels above this value (in [0, 1]) are foreground.")
flags.DEFINE_integer("limit_train", 0, "Use only this many training images (0: all).")
flags.DEFINE_integer("limit_test", 0, "Use only this many test images (0: all).")
flags.DEFINE_integer("seed", 1, "Random seed.")
FLAGS = flags.FLAGS

NUM_CLASSES = 11  # background, then the 10 garment classes


def masks(images, labels, threshold):
    """Per-pixel classes: 0 for background, `label + 1` for the garment."""
    foreground = images[..., 0] > threshold
    return np.where(foreground, labels[:, None, None] + 1, 0).astype("int32")


def conv_bn_relu(x, filters, name):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def unet(input_shape=(28, 28, 1), width=16):
    """A two-level U-Net: 28 -> 14 -> 7 and back, with skips."""
    inputs = keras.Input(input_shape)
    e1 = conv_bn_relu(inputs, width, "enc1")  # 28x28
    e2 = conv_bn_relu(keras.layers.MaxPooling2D()(e1), 2 * width, "enc2")  # 14x14
    bottom = conv_bn_relu(keras.layers.MaxPooling2D()(e2), 4 * width, "bottom")  # 7x7
    up2 = keras.layers.Conv2DTranspose(2 * width, 2, strides=2, name="up2")(bottom)  # learned
    d2 = conv_bn_relu(keras.layers.Concatenate()([up2, e2]), 2 * width, "dec2")
    up1 = keras.layers.UpSampling2D(name="up1")(d2)  # nearest neighbour
    d1 = conv_bn_relu(keras.layers.Concatenate()([up1, e1]), width, "dec1")
    logits = keras.layers.Conv2D(NUM_CLASSES, 1, name="logits")(d1)
    return keras.Model(inputs, logits, name="unet")


def scores(predicted, truth):
    """Pixel accuracy and mean IoU over the classes present."""
    ious = []
    for c in range(NUM_CLASSES):
        union = np.sum((predicted == c) | (truth == c))
        if union:
            ious.append(np.sum((predicted == c) & (truth == c)) / union)
    return float(np.mean(predicted == truth)), float(np.mean(ious))


def train(model, x, y, epochs, learning_rate):
    steps = epochs * -(-len(x) // FLAGS.batch_size)
    one_trace.compile(
        model,
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=epochs, batch_size=FLAGS.batch_size, verbose=2)


def evaluate(results, name, logits, truth):
    predicted = logits.argmax(-1)
    results[f"{name}_pixel_accuracy"], results[f"{name}_mean_iou"] = scores(predicted, truth)
    return predicted


def main(argv):
    del argv
    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    (x_train, y_train), (x_test, y_test) = idx_data.load_for_training(
        "fashion_mnist", FLAGS.data_dir, FLAGS.limit_train
    )
    if FLAGS.limit_test:
        x_test, y_test = x_test[: FLAGS.limit_test], y_test[: FLAGS.limit_test]
    m_train, m_test = (
        masks(x, y, FLAGS.threshold) for x, y in ((x_train, y_train), (x_test, y_test))
    )

    network = unet()
    train(network, x_train, m_train, FLAGS.float_epochs, FLAGS.float_lr)
    results = {}
    evaluate(results, "float", network.predict(x_test, verbose=0), m_test)

    qat = kq.convert_quant_network(
        network, quant_delay=FLAGS.quant_delay, freeze_bn=FLAGS.freeze_bn
    )
    train(qat, x_train, m_train, FLAGS.qat_epochs, FLAGS.qat_lr)
    qat.save(os.path.join(FLAGS.output_dir, "unet_qat.keras"))
    keras_predicted = evaluate(results, "qat", qat.predict(x_test, verbose=0), m_test)

    int8_bytes = kq.export_tflite(qat, os.path.join(FLAGS.output_dir, "unet_int8.tflite"))
    tflite_logits, _ = kq.run_tflite(int8_bytes, x_test)
    tflite_predicted = evaluate(results, "int8_tflite", tflite_logits, m_test)
    results.update(
        pixel_agreement=float(np.mean(tflite_predicted == keras_predicted)),
        int8_tflite_bytes=len(int8_bytes),
        float_tflite_bytes=len(kq.export_float_tflite(network)),
        train_images=len(x_train),
        test_images=len(x_test),
    )
    with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(f"{'model':<22}{'pixel accuracy':>16}{'mean IoU':>10}")
    for name, label in (
        ("float", "float"),
        ("qat", "QAT (int8 simulated)"),
        ("int8_tflite", "int8 TFLite"),
    ):
        print(
            f"{label:<22}{100 * results[f'{name}_pixel_accuracy']:>15.2f}%"
            f"{100 * results[f'{name}_mean_iou']:>9.2f}%"
        )
    print(
        f"int8 TFLite vs Keras QAT: {100 * results['pixel_agreement']:.2f} % of pixels agree; "
        f"size {results['int8_tflite_bytes']} B vs {results['float_tflite_bytes']} B float "
        f"({results['int8_tflite_bytes'] / results['float_tflite_bytes']:.3f}x)"
    )


if __name__ == "__main__":
    app.run(main)
