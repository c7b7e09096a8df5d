"""`Conv2DTransposeBnAct`: a transposed 2D convolution as a fusion layer.

In the integer model it is a TRANSPOSE_CONV with int8 weights and an int32
bias.
"""

import keras
import tensorflow as tf

from keras_qat.layers.fusion import FusionLayer


@keras.saving.register_keras_serializable(package="keras_qat")
class Conv2DTransposeBnAct(FusionLayer):
    """Transposed 2D convolution, optional BatchNormalization and activation.

    A drop-in for `keras.layers.Conv2DTranspose` (followed by
    `BatchNormalization` when `has_bn=True`). The convolution is a
    `keras.layers.Conv2DTranspose` sub-layer named `conv`, whose kernel is
    `(kh, kw, filters, in_channels)`; `kernel()` is that kernel with the
    output channels last, `(kh, kw, in_channels, filters)`, so that folding
    and per-channel ranges are per output channel.

    Args:
        filters, kernel_size, strides, padding, output_padding, data_format,
            dilation_rate, use_bias, kernel_initializer, bias_initializer,
            kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: As in `keras.layers.Conv2DTranspose`.
        activation: Activation applied last (see `Conv2DBnAct`).
        activity_regularizer: Regularizer of the layer's output.
        has_bn: Whether a BatchNormalization follows the convolution.
        **kwargs: BatchNormalization arguments and base layer keyword
            arguments (see `Conv2DBnAct`).

    Input shape:
        4D tensor `(batch, height, width, channels)` (channels last).

    Output shape:
        4D tensor `(batch, new_height, new_width, filters)`.

    Raises:
        ValueError: for an invalid argument (as
            `keras.layers.Conv2DTranspose` does).

    Example:

    >>> layer = Conv2DTransposeBnAct(4, 3, strides=2, padding="same",
    ...                              has_bn=True, activation="relu")
    >>> layer(np.zeros((2, 8, 8, 3), "float32")).shape
    TensorShape([2, 16, 16, 4])
    """

    int4_storage = False  # TRANSPOSE_CONV takes no INT4 weights (int8 storage)

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        output_padding=None,
        data_format=None,
        dilation_rate=(1, 1),
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
        self.conv = keras.layers.Conv2DTranspose(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            output_padding=output_padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
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
        return tf.transpose(self.conv.kernel, [0, 1, 3, 2])

    def kernel_op(self, inputs, kernel):
        conv = self.conv
        return keras.ops.conv_transpose(
            inputs,
            tf.transpose(kernel, [0, 1, 3, 2]),
            strides=list(conv.strides),
            padding=conv.padding,
            output_padding=conv.output_padding,
            dilation_rate=conv.dilation_rate,
            data_format=conv.data_format,
        )
