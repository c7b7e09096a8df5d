"""`Conv2DBnAct` and `DepthwiseConv2DBnAct`: 2D convolutions as fusion layers."""

import keras
import tensorflow as tf

from keras_qat.layers.call_context import is_tracing_for_export
from keras_qat.layers.fusion import FusionLayer


@keras.saving.register_keras_serializable(package="keras_qat")
class Conv2DBnAct(FusionLayer):
    """2D convolution, optional BatchNormalization, optional activation.

    A drop-in for `keras.layers.Conv2D` (followed by `BatchNormalization` when
    `has_bn=True`), and the unit that `convert_quant_network` quantizes. The
    convolution is a `keras.layers.Conv2D` sub-layer named `conv`, the
    BatchNorm a `keras.layers.BatchNormalization` named `bn`; the activation
    comes last.

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate,
            groups, use_bias, kernel_initializer, bias_initializer,
            kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: As in `keras.layers.Conv2D`.
        activation: Activation applied last: a name (`"relu"`, `"relu6"`,
            `"sigmoid"`, `"leaky_relu"`, `"hard_sigmoid"`, `"hard_silu"` /
            `"hard_swish"`, ...), a callable, or `None`.
        activity_regularizer: Regularizer of the layer's output (after the
            BatchNorm and the activation).
        has_bn: Whether a BatchNormalization follows the convolution.
        **kwargs: BatchNormalization arguments (`momentum`, `epsilon`,
            `synchronized`, ...; see `FusionLayer`) and base layer keyword
            arguments, such as `name`.

    Input shape:
        4D tensor `(batch, height, width, channels)` (channels last).

    Output shape:
        4D tensor `(batch, new_height, new_width, filters)`.

    Raises:
        ValueError: for an invalid argument (as `keras.layers.Conv2D` does).

    Example:

    >>> layer = Conv2DBnAct(8, 3, padding="same", has_bn=True,
    ...                     activation="relu")
    >>> layer(np.zeros((2, 16, 16, 3), "float32")).shape
    TensorShape([2, 16, 16, 8])
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        has_bn=False,
        **kwargs,
    ):
        super().__init__(
            has_bn=has_bn,
            activation=activation,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            groups=groups,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            dtype=self.dtype_policy,
            name="conv",
        )

    @property
    def linear_layer(self):
        return self.conv

    def kernel_op(self, inputs, kernel):
        return self.conv.convolution_op(inputs, kernel)


def dilated_depthwise_for_export(inputs, kernel, padding, dilation_rate):
    """A dilated depthwise convolution as one TensorFlow op, for the
    converter.

    `tf.nn.depthwise_conv2d` computes a dilated convolution between a
    SPACE_TO_BATCH_ND and a BATCH_TO_SPACE_ND, which the converter leaves in
    float once a fake quant and a bias sit around it (measured);
    `DepthwiseConv2dNative` with `dilations` computes the same values and
    becomes one int8 DEPTHWISE_CONV_2D with its dilation factors. Its
    gradient fails on oneDNN CPUs, so it is used for export only (strides
    are 1: Keras refuses strides with dilation).
    """
    return tf.raw_ops.DepthwiseConv2dNative(
        input=inputs,
        filter=kernel,
        strides=[1, 1, 1, 1],
        padding=padding,
        dilations=[1, *dilation_rate, 1],
    )


@keras.saving.register_keras_serializable(package="keras_qat")
class DepthwiseConv2DBnAct(FusionLayer):
    """Depthwise 2D convolution, optional BatchNormalization and activation.

    A drop-in for `keras.layers.DepthwiseConv2D` (followed by
    `BatchNormalization` when `has_bn=True`). The convolution is a
    `keras.layers.DepthwiseConv2D` sub-layer named `depthwise`, the
    BatchNorm a `keras.layers.BatchNormalization` named `bn`. Output channel
    `c * depth_multiplier + m` is filter `m` of input channel `c`, as in
    Keras and TFLite. `kernel()` is the depthwise kernel seen as
    `(kh, kw, 1, in_channels * depth_multiplier)`, TFLite's layout, so that
    quantized layers keep one weight range per output channel (tfmot
    quantized the wrong axis here, tensorflow#47858).

    Args:
        kernel_size, strides, padding, depth_multiplier, data_format,
            dilation_rate, use_bias, depthwise_initializer, bias_initializer,
            depthwise_regularizer, bias_regularizer, depthwise_constraint,
            bias_constraint: As in `keras.layers.DepthwiseConv2D`.
        activation: Activation applied last (see `Conv2DBnAct`).
        activity_regularizer: Regularizer of the layer's output.
        has_bn: Whether a BatchNormalization follows the convolution.
        **kwargs: BatchNormalization arguments and base layer keyword
            arguments (see `Conv2DBnAct`).

    Input shape:
        4D tensor `(batch, height, width, channels)` (channels last).

    Output shape:
        4D tensor `(batch, new_height, new_width, channels * depth_multiplier)`.

    Raises:
        ValueError: for an invalid argument (as `keras.layers.DepthwiseConv2D`
            does).

    Example:

    >>> layer = DepthwiseConv2DBnAct(3, padding="same", depth_multiplier=2,
    ...                              has_bn=True, activation="relu6")
    >>> layer(np.zeros((2, 16, 16, 4), "float32")).shape
    TensorShape([2, 16, 16, 8])
    """

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        depth_multiplier=1,
        data_format=None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        bias_constraint=None,
        has_bn=False,
        **kwargs,
    ):
        super().__init__(
            has_bn=has_bn,
            activation=activation,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.depthwise = keras.layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            padding=padding,
            depth_multiplier=depth_multiplier,
            data_format=data_format,
            dilation_rate=dilation_rate,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            bias_regularizer=bias_regularizer,
            depthwise_constraint=depthwise_constraint,
            bias_constraint=bias_constraint,
            dtype=self.dtype_policy,
            name="depthwise",
        )

    @property
    def linear_layer(self):
        return self.depthwise

    def kernel(self):
        kernel = self.depthwise.kernel
        kh, kw, channels, multiplier = kernel.shape
        return tf.reshape(kernel, [kh, kw, 1, channels * multiplier])

    def kernel_op(self, inputs, kernel):
        depthwise = self.depthwise
        kernel = tf.reshape(kernel, depthwise.kernel.shape)
        if is_tracing_for_export() and max(depthwise.dilation_rate) > 1:
            return dilated_depthwise_for_export(
                inputs, kernel, depthwise.padding.upper(), depthwise.dilation_rate
            )
        return keras.ops.depthwise_conv(
            inputs,
            kernel,
            strides=depthwise.strides,
            padding=depthwise.padding,
            data_format=depthwise.data_format,
            dilation_rate=depthwise.dilation_rate,
        )
