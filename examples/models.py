"""Fusion networks used by the examples and benchmarks."""

import keras
import numpy as np

import keras_qat as kq


def lenet5(num_classes=10, has_bn=False):
    """LeNet-5 as a fusion network (the first conv pads 28x28 like 32x32);
    with `has_bn=True` a BatchNorm follows each convolution."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1), name="image"),
            kq.Conv2DBnAct(6, 5, padding="same", has_bn=has_bn, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(2, name="pool1"),
            kq.Conv2DBnAct(16, 5, has_bn=has_bn, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(2, name="pool2"),
            keras.layers.Flatten(name="flatten"),
            kq.DenseBnAct(120, activation="relu", name="fc1"),
            kq.DenseBnAct(84, activation="relu", name="fc2"),
            kq.DenseBnAct(num_classes, name="fc3"),
        ],
        name="lenet5_bn" if has_bn else "lenet5",
    )


def resnet20(input_shape=(32, 32, 3), num_classes=10, depth=20, width=16):
    """A ResNet-20-style network (He et al. 2016, CIFAR variant).

    Three stages of `(depth - 2) / 6` basic blocks with 16, 32 and 64
    filters; every convolution is a `Conv2DBnAct(has_bn=True)` and every
    block ends in an `Add` shortcut (a strided 1x1 `Conv2DBnAct` where the
    shape changes), then ReLU.
    """
    if (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n + 2. Received: depth={depth}")
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="image")
    x = kq.Conv2DBnAct(width, 3, padding="same", has_bn=True, activation="relu", name="stem")(
        inputs
    )
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            name = f"s{stage}b{block}"
            y = kq.Conv2DBnAct(
                filters,
                3,
                strides=strides,
                padding="same",
                has_bn=True,
                activation="relu",
                name=f"{name}_conv1",
            )(x)
            y = kq.Conv2DBnAct(filters, 3, padding="same", has_bn=True, name=f"{name}_conv2")(y)
            if strides != 1 or x.shape[-1] != filters:
                x = kq.Conv2DBnAct(filters, 1, strides=strides, has_bn=True, name=f"{name}_proj")(x)
            x = keras.layers.Add(name=f"{name}_add")([x, y])
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = kq.DenseBnAct(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def mobilenet_v2_tiny(input_shape=(28, 28, 1), num_classes=10, width=16):
    """A MobileNetV2-style depthwise network (Sandler et al. 2018): a
    strided stem, then inverted residual blocks (1x1 expansion, 3x3
    depthwise, 1x1 linear projection; BatchNorm and ReLU6 after each but the
    projection, an `Add` shortcut where the shape stays), pooling and a
    Dense classifier."""
    inputs = keras.Input(input_shape, name="image")
    x = kq.Conv2DBnAct(
        width, 3, strides=2, padding="same", has_bn=True, activation="relu6", name="stem"
    )(inputs)
    for index, (filters, strides) in enumerate([(16, 1), (24, 2), (24, 1), (32, 2), (32, 1)]):
        name = f"block{index}"
        y = kq.Conv2DBnAct(
            4 * x.shape[-1], 1, has_bn=True, activation="relu6", name=f"{name}_expand"
        )(x)
        y = kq.DepthwiseConv2DBnAct(
            3, strides=strides, padding="same", has_bn=True, activation="relu6", name=f"{name}_dw"
        )(y)
        y = kq.Conv2DBnAct(filters, 1, has_bn=True, name=f"{name}_project")(y)
        x = keras.layers.Add(name=f"{name}_add")([x, y]) if y.shape == x.shape else y
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = kq.DenseBnAct(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2_tiny")


# The ViT's patch size.
PATCH = 7


def position_encoding(tokens, width):
    """The fixed sinusoidal encoding of Vaswani et al. 2017, float32."""
    position = np.arange(tokens)[:, None]
    rates = 1.0 / 10000 ** (2 * (np.arange(width)[None] // 2) / width)
    angles = position * rates
    encoding = np.where(np.arange(width) % 2 == 0, np.sin(angles), np.cos(angles))
    return encoding.astype("float32")


def encoder_block(x, width, heads, name):
    attended = keras.layers.MultiHeadAttention(heads, width // heads, name=f"{name}_attention")(
        x, x
    )
    x = keras.layers.LayerNormalization(name=f"{name}_norm1")(keras.layers.Add()([x, attended]))
    hidden = keras.layers.Dense(2 * width, activation="gelu", name=f"{name}_mlp1")(x)
    mlp = keras.layers.Dense(width, name=f"{name}_mlp2")(hidden)
    return keras.layers.LayerNormalization(name=f"{name}_norm2")(keras.layers.Add()([x, mlp]))


def vit(input_shape=(28, 28, 1), width=64, heads=4, blocks=2, classes=10):
    """A small vision transformer (`examples/vit_quant.py`): 7x7 patches
    embedded by a strided Conv2D, a fixed sinusoidal position encoding
    added, encoder blocks (MultiHeadAttention, LayerNormalization, a GELU
    MLP, residual Adds), mean pooling and a Dense classifier."""
    tokens = (input_shape[0] // PATCH) * (input_shape[1] // PATCH)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, PATCH, strides=PATCH, name="patch_embedding")(inputs)
    x = keras.layers.Reshape((tokens, width))(x)
    x = x + position_encoding(tokens, width)  # a float32 constant: an int8 ADD
    for block in range(blocks):
        x = encoder_block(x, width, heads, f"block{block + 1}")
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="classifier")(x), name="vit")


# name -> (builder, input shape), for the benchmarks.
NETWORKS = {
    "lenet5": (lenet5, (28, 28, 1)),
    "lenet5_bn": (lambda num_classes=10: lenet5(num_classes, has_bn=True), (28, 28, 1)),
    "resnet20": (resnet20, (32, 32, 3)),
}
