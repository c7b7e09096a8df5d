"""`Conv1DBnAct` and `DepthwiseConv1DBnAct`: 1D convolutions as fusion layers.

Each composes its Keras layer (sub-layer `conv`) with an optional BatchNorm
and an activation, and only says how its kernel looks with the output
channels last (`kernel()`) and how to apply such a kernel (`kernel_op`). In
the integer model a `Conv1D` is a CONV_2D between an EXPAND_DIMS and a
SQUEEZE (how TensorFlow computes a 1-D convolution), a `DepthwiseConv1D`
likewise a DEPTHWISE_CONV_2D; both take per-output-channel int8 weights and
an int32 bias.
"""

import keras
import tensorflow as tf

from keras_qat.layers.call_context import is_tracing_for_export
from keras_qat.layers.conv2d import dilated_depthwise_for_export
from keras_qat.layers.fusion import FusionLayer


def _causal_padding(inputs, conv):
    """4D inputs `(batch, 1, steps, in)` padded on the left as Keras pads a
    causal 1D convolution `conv`, and the padding left to apply."""
    if conv.padding != "causal":
        return inputs, conv.padding.upper()
    left = conv.dilation_rate[0] * (conv.kernel_size[0] - 1)
    return tf.pad(inputs, [[0, 0], [0, 0], [left, 0], [0, 0]]), "VALID"


def _height_one_bn_input_shape(layer, input_shape):
    """The BatchNorm input of a 1D fusion layer: 4D once it is quantized."""
    shape = layer.linear_layer.compute_output_shape(input_shape)
    return shape if not layer.quantized else (shape[0], 1) + tuple(shape[1:])


def _call_as_height_one(layer, inputs, training, input_scale):
    """`FusionLayer.call` of a 1D fusion layer; a quantized layer runs as a
    2D convolution of height 1, bias, BatchNorm and activation included, as
    TensorFlow runs a 1D one: the converter then sees the quantized kernel
    with its channels last and the bias next to the convolution (a
    per-channel fake quant before TensorFlow's own EXPAND_DIMS would leave
    its quantized axis behind)."""
    if not layer.quantized:
        return FusionLayer.call(layer, inputs, training=training, input_scale=input_scale)
    outputs = FusionLayer.call(layer, tf.expand_dims(inputs, 1), training, input_scale)
    return tf.squeeze(outputs, 1)


@keras.saving.register_keras_serializable(package="keras_qat")
class Conv1DBnAct(FusionLayer):
    """1D convolution, optional BatchNormalization, optional activation.

    A drop-in for `keras.layers.Conv1D` (followed by `BatchNormalization`
    when `has_bn=True`). The convolution is a `keras.layers.Conv1D`
    sub-layer named `conv`, the BatchNorm a `keras.layers.BatchNormalization`
    named `bn`; the activation comes last. `padding="causal"` pads the
    input on the left, as Keras does.

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate,
            groups, use_bias, kernel_initializer, bias_initializer,
            kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: As in `keras.layers.Conv1D`.
        activation: Activation applied last (see `Conv2DBnAct`).
        activity_regularizer: Regularizer of the layer's output.
        has_bn: Whether a BatchNormalization follows the convolution.
        **kwargs: BatchNormalization arguments and base layer keyword
            arguments (see `Conv2DBnAct`).

    Input shape:
        3D tensor `(batch, steps, channels)` (channels last).

    Output shape:
        3D tensor `(batch, new_steps, filters)`.

    Raises:
        ValueError: for an invalid argument (as `keras.layers.Conv1D` does).

    Example:

    >>> layer = Conv1DBnAct(8, 3, padding="causal", has_bn=True,
    ...                     activation="relu")
    >>> layer(np.zeros((2, 16, 4), "float32")).shape
    TensorShape([2, 16, 8])
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
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
        self.conv = keras.layers.Conv1D(
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

    def kernel(self):
        """The kernel as a `(1, kernel_size, in, filters)` 2D kernel (see
        `call`)."""
        return self.conv.kernel[None]

    def kernel_op(self, inputs, kernel):
        """The convolution of 4D inputs `(batch, 1, steps, in)` (see `call`)."""
        conv = self.conv
        inputs, padding = _causal_padding(inputs, conv)
        if is_tracing_for_export() or conv.dilation_rate[0] == 1:
            # One Conv2D op: the converter's CONV_2D, dilation factors included.
            return tf.nn.conv2d(
                inputs,
                kernel,
                strides=[1, 1, conv.strides[0], 1],
                padding=padding,
                dilations=[1, 1, conv.dilation_rate[0], 1],
            )
        # Dilated, as Keras' Conv1D computes it (SPACE_TO_BATCH_ND around an
        # undilated Conv2D): TensorFlow's Eigen CPU kernels, the default
        # where oneDNN is off, have no gradient of a dilated Conv2D.
        return tf.nn.convolution(
            inputs, kernel, padding=padding, dilations=[1, conv.dilation_rate[0]]
        )

    def bn_input_shape(self, input_shape):
        return _height_one_bn_input_shape(self, input_shape)

    def call(self, inputs, training=False, input_scale=None):
        """As `FusionLayer.call`; quantized, as a height-1 2D convolution."""
        return _call_as_height_one(self, inputs, training, input_scale)


@keras.saving.register_keras_serializable(package="keras_qat")
class DepthwiseConv1DBnAct(FusionLayer):
    """Depthwise 1D convolution, optional BatchNormalization and activation.

    A drop-in for `keras.layers.DepthwiseConv1D` (followed by
    `BatchNormalization` when `has_bn=True`). The convolution is a
    `keras.layers.DepthwiseConv1D` sub-layer named `depthwise`, the
    BatchNorm a `keras.layers.BatchNormalization` named `bn`; the activation
    comes last. Quantized, it runs as a depthwise 2D convolution of height 1
    (as `Conv1DBnAct` does), with one range per output channel
    (`in_channels * depth_multiplier` of them) when per channel.

    Args:
        kernel_size, strides, padding, depth_multiplier, data_format,
            dilation_rate, use_bias, depthwise_initializer, bias_initializer,
            depthwise_regularizer, bias_regularizer, depthwise_constraint,
            bias_constraint: As in `keras.layers.DepthwiseConv1D`.
        activation: Activation applied last (see `Conv2DBnAct`).
        activity_regularizer: Regularizer of the layer's output.
        has_bn: Whether a BatchNormalization follows the convolution.
        **kwargs: BatchNormalization arguments and base layer keyword
            arguments (see `Conv2DBnAct`).

    Input shape:
        3D tensor `(batch, steps, channels)` (channels last).

    Output shape:
        3D tensor `(batch, new_steps, channels * depth_multiplier)`.

    Raises:
        ValueError: for an invalid argument (as
            `keras.layers.DepthwiseConv1D` does).

    Example:

    >>> layer = DepthwiseConv1DBnAct(3, depth_multiplier=2, padding="same",
    ...                              has_bn=True, activation="relu")
    >>> layer(np.zeros((2, 16, 4), "float32")).shape
    TensorShape([2, 16, 8])
    """

    def __init__(
        self,
        kernel_size,
        strides=1,
        padding="valid",
        depth_multiplier=1,
        data_format=None,
        dilation_rate=1,
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
        self.depthwise = keras.layers.DepthwiseConv1D(
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
        """The kernel `(kernel_size, in, multiplier)` as the 2D depthwise
        kernel `(1, kernel_size, 1, in * multiplier)`, output channels last."""
        size, channels, multiplier = self.depthwise.kernel.shape
        return tf.reshape(self.depthwise.kernel, [1, size, 1, channels * multiplier])

    def kernel_op(self, inputs, kernel):
        """The depthwise convolution of 4D inputs `(batch, 1, steps, in)`."""
        depthwise = self.depthwise
        size, channels, multiplier = depthwise.kernel.shape
        inputs, padding = _causal_padding(inputs, depthwise)
        kernel = tf.reshape(kernel, [1, size, channels, multiplier])
        if is_tracing_for_export() and depthwise.dilation_rate[0] > 1:
            return dilated_depthwise_for_export(
                inputs, kernel, padding, (1, depthwise.dilation_rate[0])
            )
        # The stride on both axes, as Keras' DepthwiseConv1D does: the same
        # values on a height of 1, and TensorFlow's Eigen CPU kernels take
        # only equal strides for a depthwise convolution.
        stride = depthwise.strides[0]
        return tf.nn.depthwise_conv2d(
            inputs,
            kernel,
            strides=[1, stride, stride, 1],
            padding=padding,
            dilations=[1, depthwise.dilation_rate[0]],
        )

    def bn_input_shape(self, input_shape):
        return _height_one_bn_input_shape(self, input_shape)

    def call(self, inputs, training=False, input_scale=None):
        """As `FusionLayer.call`; quantized, as a height-1 2D convolution."""
        return _call_as_height_one(self, inputs, training, input_scale)
