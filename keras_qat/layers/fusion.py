"""Float fusion layers: a conv or dense layer, optional BatchNorm, activation.

A fusion layer is one unit of an integer model: the kernel, the BatchNorm
that will be folded into it and the activation that the integer kernel
clamps to. `convert_quant_network` turns each one into its quantized
counterpart (`keras_qat.layers.quant`).

The layers compose Keras' own `Conv2D` / `Dense` and `BatchNormalization`
(sub-layers `conv` / `dense` and `bn`), so the float arithmetic is exactly
Keras'.
"""

import keras
import tensorflow as tf

ACTIVATIONS_HINT = (
    "relu, relu6, sigmoid, leaky_relu, hard_sigmoid, hard_silu (hard_swish), "
    "silu, tanh, linear or None"
)


def _get_activation(activation):
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Received an invalid value for `activation`, expected a Keras "
            f"activation such as {ACTIVATIONS_HINT}. "
            f"Received: activation={activation!r}"
        ) from error


class _FusedBnAct(keras.layers.Layer):
    """Shared part of the fusion layers: the BatchNorm and the activation.

    Subclasses create the linear sub-layer in `__init__` and implement
    `linear(inputs)`, the conv or matmul plus bias.
    """

    def __init__(
        self,
        has_bn=False,
        momentum=0.99,
        epsilon=1e-3,
        gamma_initializer="ones",
        beta_initializer="zeros",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        synchronized=False,
        activation=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(has_bn, bool):
            raise ValueError(
                "Received an invalid value for `has_bn`, expected a boolean. "
                f"Received: has_bn={has_bn!r}"
            )
        self.has_bn = has_bn
        self.activation = _get_activation(activation)
        self.bn = None
        if has_bn:
            self.bn = keras.layers.BatchNormalization(
                momentum=momentum,
                epsilon=epsilon,
                gamma_initializer=gamma_initializer,
                beta_initializer=beta_initializer,
                moving_mean_initializer=moving_mean_initializer,
                moving_variance_initializer=moving_variance_initializer,
                synchronized=synchronized,
                name="bn",
            )
        self._bn_config = dict(
            momentum=momentum,
            epsilon=epsilon,
            synchronized=synchronized,
            gamma_initializer=keras.initializers.serialize(
                keras.initializers.get(gamma_initializer)
            ),
            beta_initializer=keras.initializers.serialize(
                keras.initializers.get(beta_initializer)
            ),
            moving_mean_initializer=keras.initializers.serialize(
                keras.initializers.get(moving_mean_initializer)
            ),
            moving_variance_initializer=keras.initializers.serialize(
                keras.initializers.get(moving_variance_initializer)
            ),
        )

    @property
    def linear_layer(self):
        """The `Conv2D` or `Dense` sub-layer."""
        raise NotImplementedError

    def build(self, input_shape):
        self.linear_layer.build(input_shape)
        if self.bn is not None:
            self.bn.build(self.linear_layer.compute_output_shape(input_shape))

    def compute_output_shape(self, input_shape):
        return self.linear_layer.compute_output_shape(input_shape)

    def linear(self, inputs, training=False):
        """The conv or matmul, plus bias; quantized subclasses override it."""
        return self.linear_layer(inputs)

    def apply_kernel(self, inputs, kernel):
        """The conv or matmul of `inputs` with `kernel`, without bias."""
        raise NotImplementedError

    def call(self, inputs, training=False):
        outputs = self.linear(inputs, training=training)
        if self.bn is not None:
            outputs = self.bn(outputs, training=training)
        return self.activation(outputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            has_bn=self.has_bn,
            activation=keras.activations.serialize(self.activation),
            **self._bn_config,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class Conv2DBnAct(_FusedBnAct):
    """2D convolution, optional BatchNormalization, optional activation.

    A drop-in for `keras.layers.Conv2D` (followed by `BatchNormalization` when
    `has_bn=True`), and the unit that `convert_quant_network` quantizes. The
    convolution is a `keras.layers.Conv2D` sub-layer named `conv`, the
    BatchNorm a `keras.layers.BatchNormalization` named `bn`.

    Args:
        filters: Number of output channels.
        kernel_size: Integer or pair of integers, the window size.
        strides: Integer or pair of integers.
        padding: `"valid"` or `"same"`.
        dilation_rate: Integer or pair of integers.
        use_bias: Whether the convolution adds a bias.
        kernel_initializer: Initializer of the kernel.
        bias_initializer: Initializer of the bias.
        kernel_regularizer: Optional regularizer of the kernel.
        bias_regularizer: Optional regularizer of the bias.
        has_bn: Whether a BatchNormalization follows the convolution.
        momentum: BatchNorm moving-average momentum.
        epsilon: BatchNorm epsilon.
        gamma_initializer: BatchNorm initializers (also `beta_initializer`,
            `moving_mean_initializer`, `moving_variance_initializer`).
        synchronized: Whether BatchNorm batch statistics are computed over
            the global batch under a `tf.distribute` strategy (Keras'
            `BatchNormalization(synchronized=True)`).
        activation: Activation applied last: a name (`"relu"`, `"relu6"`,
            `"sigmoid"`, `"leaky_relu"`, `"hard_sigmoid"`, `"hard_silu"` /
            `"hard_swish"`, ...), a callable, or `None`.
        **kwargs: Base layer keyword arguments, such as `name`.

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
        strides=1,
        padding="valid",
        dilation_rate=1,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        has_bn=False,
        momentum=0.99,
        epsilon=1e-3,
        gamma_initializer="ones",
        beta_initializer="zeros",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        synchronized=False,
        activation=None,
        **kwargs,
    ):
        super().__init__(
            has_bn=has_bn,
            synchronized=synchronized,
            momentum=momentum,
            epsilon=epsilon,
            gamma_initializer=gamma_initializer,
            beta_initializer=beta_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            activation=activation,
            **kwargs,
        )
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            name="conv",
        )

    @property
    def linear_layer(self):
        return self.conv

    def apply_kernel(self, inputs, kernel):
        return self.conv.convolution_op(inputs, kernel)

    def get_config(self):
        config = super().get_config()
        conv_config = self.conv.get_config()
        for key in (
            "filters",
            "kernel_size",
            "strides",
            "padding",
            "dilation_rate",
            "use_bias",
            "kernel_initializer",
            "bias_initializer",
            "kernel_regularizer",
            "bias_regularizer",
        ):
            config[key] = conv_config[key]
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class DenseBnAct(_FusedBnAct):
    """Densely-connected layer, optional BatchNormalization and activation.

    A drop-in for `keras.layers.Dense` (followed by `BatchNormalization` when
    `has_bn=True`), and the unit that `convert_quant_network` quantizes. The
    matmul is a `keras.layers.Dense` sub-layer named `dense`, the BatchNorm a
    `keras.layers.BatchNormalization` named `bn`.

    Args:
        units: Number of output units.
        use_bias: Whether the layer adds a bias.
        kernel_initializer: Initializer of the kernel.
        bias_initializer: Initializer of the bias.
        kernel_regularizer: Optional regularizer of the kernel.
        bias_regularizer: Optional regularizer of the bias.
        has_bn: Whether a BatchNormalization follows the matmul.
        momentum: BatchNorm moving-average momentum.
        epsilon: BatchNorm epsilon.
        gamma_initializer: BatchNorm initializers (also `beta_initializer`,
            `moving_mean_initializer`, `moving_variance_initializer`).
        synchronized: Whether BatchNorm batch statistics are computed over
            the global batch under a `tf.distribute` strategy.
        activation: Activation applied last (see `Conv2DBnAct`).
        **kwargs: Base layer keyword arguments, such as `name`.

    Input shape:
        N-D tensor `(batch, ..., input_dim)`.

    Output shape:
        N-D tensor `(batch, ..., units)`.

    Raises:
        ValueError: for an invalid argument (as `keras.layers.Dense` does).

    Example:

    >>> layer = DenseBnAct(10, activation="relu6")
    >>> layer(np.zeros((4, 32), "float32")).shape
    TensorShape([4, 10])
    """

    def __init__(
        self,
        units,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        has_bn=False,
        momentum=0.99,
        epsilon=1e-3,
        gamma_initializer="ones",
        beta_initializer="zeros",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        synchronized=False,
        activation=None,
        **kwargs,
    ):
        super().__init__(
            has_bn=has_bn,
            synchronized=synchronized,
            momentum=momentum,
            epsilon=epsilon,
            gamma_initializer=gamma_initializer,
            beta_initializer=beta_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            activation=activation,
            **kwargs,
        )
        self.dense = keras.layers.Dense(
            units,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            name="dense",
        )

    @property
    def linear_layer(self):
        return self.dense

    def apply_kernel(self, inputs, kernel):
        if kernel.shape.rank == 4:  # (1, 1, in, out): as a 1x1 convolution
            return tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID")
        return keras.ops.matmul(inputs, kernel)

    def get_config(self):
        config = super().get_config()
        dense_config = self.dense.get_config()
        for key in (
            "units",
            "use_bias",
            "kernel_initializer",
            "bias_initializer",
            "kernel_regularizer",
            "bias_regularizer",
        ):
            config[key] = dense_config[key]
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class DepthwiseConv2DBnAct(_FusedBnAct):
    """Depthwise 2D convolution, optional BatchNormalization and activation.

    A drop-in for `keras.layers.DepthwiseConv2D` (followed by
    `BatchNormalization` when `has_bn=True`). The convolution is a
    `keras.layers.DepthwiseConv2D` sub-layer named `depthwise`, the
    BatchNorm a `keras.layers.BatchNormalization` named `bn`. Output channel
    `c * depth_multiplier + m` is filter `m` of input channel `c`, as in
    Keras and TFLite; quantized layers keep one weight range per output
    channel (`in_channels * depth_multiplier` ranges).

    Args:
        kernel_size: Integer or pair of integers, the window size.
        strides: Integer or pair of integers.
        padding: `"valid"` or `"same"`.
        depth_multiplier: Output channels per input channel.
        dilation_rate: Integer or pair of integers.
        use_bias: Whether the convolution adds a bias.
        depthwise_initializer: Initializer of the depthwise kernel.
        bias_initializer: Initializer of the bias.
        depthwise_regularizer: Optional regularizer of the kernel.
        bias_regularizer: Optional regularizer of the bias.
        has_bn: Whether a BatchNormalization follows the convolution.
        momentum, epsilon, gamma_initializer, ...: BatchNorm arguments, as
            in `Conv2DBnAct`.
        synchronized: Whether BatchNorm batch statistics are computed over
            the global batch under a `tf.distribute` strategy.
        activation: Activation applied last (see `Conv2DBnAct`).
        **kwargs: Base layer keyword arguments, such as `name`.

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
        strides=1,
        padding="valid",
        depth_multiplier=1,
        dilation_rate=1,
        use_bias=True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        has_bn=False,
        momentum=0.99,
        epsilon=1e-3,
        gamma_initializer="ones",
        beta_initializer="zeros",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        synchronized=False,
        activation=None,
        **kwargs,
    ):
        super().__init__(
            has_bn=has_bn,
            synchronized=synchronized,
            momentum=momentum,
            epsilon=epsilon,
            gamma_initializer=gamma_initializer,
            beta_initializer=beta_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            activation=activation,
            **kwargs,
        )
        self.depthwise = keras.layers.DepthwiseConv2D(
            kernel_size,
            strides=strides,
            padding=padding,
            depth_multiplier=depth_multiplier,
            dilation_rate=dilation_rate,
            use_bias=use_bias,
            depthwise_initializer=depthwise_initializer,
            bias_initializer=bias_initializer,
            depthwise_regularizer=depthwise_regularizer,
            bias_regularizer=bias_regularizer,
            name="depthwise",
        )

    @property
    def linear_layer(self):
        return self.depthwise

    def apply_kernel(self, inputs, kernel):
        """Depthwise conv with `kernel` of the sub-layer's shape, or of shape
        `(kh, kw, 1, channels * depth_multiplier)` (output channels last)."""
        kernel = tf.reshape(kernel, self.depthwise.kernel.shape)
        depthwise = self.depthwise
        return keras.ops.depthwise_conv(
            inputs,
            kernel,
            strides=depthwise.strides,
            padding=depthwise.padding,
            data_format=depthwise.data_format,
            dilation_rate=depthwise.dilation_rate,
        )

    def get_config(self):
        config = super().get_config()
        depthwise_config = self.depthwise.get_config()
        for key in (
            "kernel_size",
            "strides",
            "padding",
            "depth_multiplier",
            "dilation_rate",
            "use_bias",
            "depthwise_initializer",
            "bias_initializer",
            "depthwise_regularizer",
            "bias_regularizer",
        ):
            config[key] = depthwise_config[key]
        return config
