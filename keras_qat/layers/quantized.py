"""Quantized fusion layers: a fusion layer plus its `WeightQuantizer`.

Each class here only declares a mode of its fusion layer (the behaviour
lives once, in `FusionLayer` and `bn_folding`):

- `Quant...BnAct`: the kernel is fake-quantized by the `weight_quantizer`
  sub-layer before the conv or matmul; a BatchNorm, if any, follows as an
  ordinary BatchNorm (MindSpore's `bn_fold=False`), in training without
  the bias that it cancels (`keras_qat.layers.batch_statistics`).
- `Quant...BnFoldAct`: the BatchNorm is folded into the kernel, and the
  folded kernel is fake-quantized (`keras_qat.layers.bn_folding`).

Each takes every argument of its fusion layer, plus `weight_quantizer` (a
`WeightQuantizer`, a dict of its options, or None for the defaults) and, when
folded, `freeze_bn`. The output activation is quantized by a `FakeQuant`
that `convert_quant_network` places after the layer. Called with
`input_scale` (the scale of the input's grid, from the `FakeQuant` before the
layer), a layer adds its bias on the integer kernel's int32 grid.
"""

import keras

from keras_qat.layers.conv1d import Conv1DBnAct, DepthwiseConv1DBnAct
from keras_qat.layers.conv2d import Conv2DBnAct, DepthwiseConv2DBnAct
from keras_qat.layers.conv2d_transpose import Conv2DTransposeBnAct
from keras_qat.layers.dense import DenseBnAct


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv2DBnAct(Conv2DBnAct):
    """`Conv2DBnAct` whose kernel is fake-quantized.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        *args, **kwargs: The arguments of `Conv2DBnAct`.

    Example:

    >>> layer = QuantConv2DBnAct(8, 3, activation="relu",
    ...                          weight_quantizer=dict(per_channel=True))
    >>> layer(np.ones((1, 8, 8, 3), "float32")).shape
    TensorShape([1, 6, 6, 8])
    """

    quantized = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDenseBnAct(DenseBnAct):
    """`DenseBnAct` whose kernel is fake-quantized.

    With per-channel weights, the export trace runs the layer as a 1x1
    convolution (see `DenseBnAct.call`), which TFLite quantizes per channel.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        *args, **kwargs: The arguments of `DenseBnAct`.

    Example:

    >>> layer = QuantDenseBnAct(4, weight_quantizer=dict(num_bits=4))
    >>> layer(np.ones((2, 3), "float32")).shape
    TensorShape([2, 4])
    """

    quantized = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDepthwiseConv2DBnAct(DepthwiseConv2DBnAct):
    """`DepthwiseConv2DBnAct` whose kernel is fake-quantized.

    With per-channel weights each of the `in_channels * depth_multiplier`
    output channels has its own range.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        *args, **kwargs: The arguments of `DepthwiseConv2DBnAct`.

    Example:

    >>> layer = QuantDepthwiseConv2DBnAct(
    ...     3, depth_multiplier=2, weight_quantizer=dict(per_channel=True))
    >>> layer(np.ones((1, 8, 8, 3), "float32")).shape
    TensorShape([1, 6, 6, 6])
    """

    quantized = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv2DBnFoldAct(Conv2DBnAct):
    """`Conv2DBnAct(has_bn=True)` with its BatchNorm folded into the weights.

    The fake-quantized kernel is `W * gamma / sqrt(moving_variance + eps)`,
    the kernel of the deployed integer model; see
    `keras_qat.layers.bn_folding` for the training-time correction.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        *args, **kwargs: The arguments of `Conv2DBnAct` (`has_bn=True`).

    Raises:
        ValueError: for `has_bn=False` or another invalid argument.

    Example:

    >>> layer = QuantConv2DBnFoldAct(8, 3, has_bn=True, freeze_bn=1000,
    ...                              activation="relu")
    >>> layer(np.ones((1, 8, 8, 3), "float32")).shape
    TensorShape([1, 6, 6, 8])
    """

    quantized = True
    folded = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDenseBnFoldAct(DenseBnAct):
    """`DenseBnAct(has_bn=True)` with its BatchNorm folded into the weights.

    As `QuantConv2DBnFoldAct`, for a dense layer.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        *args, **kwargs: The arguments of `DenseBnAct` (`has_bn=True`).

    Example:

    >>> layer = QuantDenseBnFoldAct(4, has_bn=True)
    >>> layer(np.ones((2, 3), "float32")).shape
    TensorShape([2, 4])
    """

    quantized = True
    folded = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDepthwiseConv2DBnFoldAct(DepthwiseConv2DBnAct):
    """`DepthwiseConv2DBnAct(has_bn=True)` with its BatchNorm folded.

    As `QuantConv2DBnFoldAct`, for a depthwise convolution: output channel
    `c * depth_multiplier + m` is scaled by its own `gamma / sigma` and, with
    per-channel weights, quantized with its own range.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        *args, **kwargs: The arguments of `DepthwiseConv2DBnAct`
            (`has_bn=True`).

    Example:

    >>> layer = QuantDepthwiseConv2DBnFoldAct(3, has_bn=True)
    >>> layer(np.ones((1, 8, 8, 4), "float32")).shape
    TensorShape([1, 6, 6, 4])
    """

    quantized = True
    folded = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv1DBnAct(Conv1DBnAct):
    """`Conv1DBnAct` whose kernel is fake-quantized.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        *args, **kwargs: The arguments of `Conv1DBnAct`.

    Example:

    >>> layer = QuantConv1DBnAct(8, 3, weight_quantizer=dict(per_channel=True))
    >>> layer(np.ones((1, 10, 3), "float32")).shape
    TensorShape([1, 8, 8])
    """

    quantized = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv1DBnFoldAct(Conv1DBnAct):
    """`Conv1DBnAct(has_bn=True)` with its BatchNorm folded into the weights.

    As `QuantConv2DBnFoldAct`, for a 1D convolution.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        *args, **kwargs: The arguments of `Conv1DBnAct` (`has_bn=True`).

    Example:

    >>> layer = QuantConv1DBnFoldAct(8, 3, has_bn=True, padding="causal")
    >>> layer(np.ones((1, 10, 3), "float32")).shape
    TensorShape([1, 10, 8])
    """

    quantized = True
    folded = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDepthwiseConv1DBnAct(DepthwiseConv1DBnAct):
    """`DepthwiseConv1DBnAct` whose kernel is fake-quantized.

    With per-channel weights each of the `in_channels * depth_multiplier`
    output channels has its own range.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        *args, **kwargs: The arguments of `DepthwiseConv1DBnAct`.

    Example:

    >>> layer = QuantDepthwiseConv1DBnAct(3, weight_quantizer=dict(per_channel=True))
    >>> layer(np.ones((1, 10, 4), "float32")).shape
    TensorShape([1, 8, 4])
    """

    quantized = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDepthwiseConv1DBnFoldAct(DepthwiseConv1DBnAct):
    """`DepthwiseConv1DBnAct(has_bn=True)` with its BatchNorm folded into
    the weights.

    As `QuantDepthwiseConv2DBnFoldAct`, for a depthwise 1D convolution.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        *args, **kwargs: The arguments of `DepthwiseConv1DBnAct` (`has_bn=True`).

    Example:

    >>> layer = QuantDepthwiseConv1DBnFoldAct(3, has_bn=True, padding="same")
    >>> layer(np.ones((1, 10, 4), "float32")).shape
    TensorShape([1, 10, 4])
    """

    quantized = True
    folded = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv2DTransposeBnAct(Conv2DTransposeBnAct):
    """`Conv2DTransposeBnAct` whose kernel is fake-quantized, per output
    channel (the `filters` axis of Keras' kernel) with `per_channel=True`.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        *args, **kwargs: The arguments of `Conv2DTransposeBnAct`.

    Example:

    >>> layer = QuantConv2DTransposeBnAct(4, 2, strides=2)
    >>> layer(np.ones((1, 4, 4, 3), "float32")).shape
    TensorShape([1, 8, 8, 4])
    """

    quantized = True


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv2DTransposeBnFoldAct(Conv2DTransposeBnAct):
    """`Conv2DTransposeBnAct(has_bn=True)` with its BatchNorm folded into the
    weights, as `QuantConv2DBnFoldAct`.

    Args:
        weight_quantizer: A `WeightQuantizer`, a dict of its options, or
            None for the defaults.
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        *args, **kwargs: The arguments of `Conv2DTransposeBnAct`
            (`has_bn=True`).

    Example:

    >>> layer = QuantConv2DTransposeBnFoldAct(4, 2, strides=2, has_bn=True)
    >>> layer(np.ones((1, 4, 4, 3), "float32")).shape
    TensorShape([1, 8, 8, 4])
    """

    quantized = True
    folded = True


# Float fusion layer -> (quantized layer, quantized layer with BatchNorm folded).
QUANTIZED_FORMS = {
    Conv2DBnAct: (QuantConv2DBnAct, QuantConv2DBnFoldAct),
    DenseBnAct: (QuantDenseBnAct, QuantDenseBnFoldAct),
    DepthwiseConv2DBnAct: (QuantDepthwiseConv2DBnAct, QuantDepthwiseConv2DBnFoldAct),
    Conv1DBnAct: (QuantConv1DBnAct, QuantConv1DBnFoldAct),
    DepthwiseConv1DBnAct: (QuantDepthwiseConv1DBnAct, QuantDepthwiseConv1DBnFoldAct),
    Conv2DTransposeBnAct: (QuantConv2DTransposeBnAct, QuantConv2DTransposeBnFoldAct),
}


def has_quantized_form(layer):
    """Whether `layer` is a float fusion layer with a quantized form."""
    return type(layer) in QUANTIZED_FORMS


def quantized_class(layer, folded):
    """The quantized class of float fusion layer `layer`, folded or not."""
    plain, folded_class = QUANTIZED_FORMS[type(layer)]
    return folded_class if folded else plain
