"""Fusion layers: a conv or dense layer, an optional BatchNorm, an activation.

A fusion layer is one unit of an integer model: the kernel, the BatchNorm
that will be folded into it and the activation that the integer kernel
clamps to. It composes Keras' own layers (sub-layers `conv` / `dense` /
`depthwise` and `bn`), so the float arithmetic is exactly Keras', and it
takes every argument of the Keras layer it stands for.

Quantization is a mode of the same layer (as `Layer.quantize` is in Keras):
the `Quant...` subclasses in `keras_qat.layers.quantized` own a
`WeightQuantizer` and, when folded, fold the BatchNorm into the kernel
(`keras_qat.layers.bn_folding`). Each kind of fusion layer only says how its
kernel looks with the output channels last (`kernel()`) and how to apply
such a kernel (`kernel_op(inputs, kernel)`).
"""

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.config import DEFAULT_FREEZE_BN, check_bool, check_int
from keras_qat.layers import batch_norm, bn_folding
from keras_qat.layers.fake_quant import WeightQuantizer
from keras_qat.layers.modes import is_tracing_for_export

ACTIVATIONS_HINT = (
    "relu, relu6, sigmoid, leaky_relu, hard_sigmoid, hard_silu (hard_swish), "
    "silu, tanh, linear or None"
)

# Config entries of the linear sub-layer that are not the fusion layer's
# arguments: its own, or options that fusion layers do not take (LoRA, and
# Keras' own post-training quantization).
_NOT_FORWARDED = (
    "name",
    "trainable",
    "dtype",
    "activation",
    "activity_regularizer",
    "quantization_config",
    "lora_rank",
    "lora_alpha",
)


def get_activation(activation):
    """`keras.activations.get`, with a Keras-style error message."""
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Received an invalid value for `activation`, expected a Keras "
            f"activation such as {ACTIVATIONS_HINT}. "
            f"Received: activation={activation!r}"
        ) from error


class FusionLayer(keras.layers.Layer):
    """Base of the fusion layers: the BatchNorm, the activation, the modes.

    Subclasses create their Keras layer (the *linear layer*) in `__init__`
    and implement `linear_layer`, `kernel()` and `kernel_op()`.

    Args:
        has_bn: Whether a BatchNormalization follows the linear layer.
        activation: Activation applied last.
        momentum, epsilon, center, scale, beta_initializer,
            gamma_initializer, moving_mean_initializer,
            moving_variance_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint, synchronized: The arguments of
            the `keras.layers.BatchNormalization` (with `has_bn=True`).
        linear_trainable: Whether the linear sub-layer trains; `False`
            keeps its weights fixed while the BatchNorm trains (a standalone
            BatchNorm fused as a 1x1 depthwise convolution of ones).
        weight_quantizer: Quantized layers only: a `WeightQuantizer`, a dict
            of its options, or None for the defaults.
        freeze_bn: Folded layers only: the training step from which the
            BatchNorm statistics are frozen.
        **kwargs: Base layer keyword arguments, such as `name`, `trainable`,
            `dtype` and `activity_regularizer` (applied to the output).
    """

    quantized = False  # the kernel is fake-quantized (the Quant... layers)
    folded = False  # the BatchNorm is folded into the kernel (Quant...BnFoldAct)

    def __init__(
        self,
        has_bn=False,
        activation=None,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        weight_quantizer=None,
        freeze_bn=DEFAULT_FREEZE_BN,
        linear_trainable=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.has_bn = check_bool("has_bn", has_bn)
        self.activation = get_activation(activation)
        bn = keras.layers.BatchNormalization(
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            synchronized=synchronized,
            dtype=self.dtype_policy,
            name="bn",
        )
        self._bn_config = {
            key: value
            for key, value in bn.get_config().items()
            if key not in ("name", "trainable", "dtype", "axis") and not key.startswith("renorm")
        }
        self.bn = bn if self.has_bn else None
        self.linear_trainable = check_bool("linear_trainable", linear_trainable)
        self._init_modes(weight_quantizer, freeze_bn)

    def _init_modes(self, weight_quantizer, freeze_bn):
        if not self.quantized:
            if weight_quantizer is not None:
                raise ValueError(
                    f"{self.__class__.__name__} is a float layer; use its Quant... "
                    "counterpart (or convert_quant_network) to quantize it. "
                    f"Received: weight_quantizer={weight_quantizer!r}"
                )
            return
        self.weight_quantizer = WeightQuantizer.get(weight_quantizer, "weight_quantizer")
        if self.folded:
            if not self.has_bn:
                raise ValueError(
                    f"{self.__class__.__name__} folds a BatchNorm and needs "
                    "has_bn=True. Received: has_bn=False"
                )
            self.freeze_bn = check_int("freeze_bn", freeze_bn)

    @property
    def linear_layer(self):
        """The Keras `Conv2D`, `Dense` or `DepthwiseConv2D` sub-layer."""
        raise NotImplementedError

    def kernel(self):
        """The linear layer's kernel, with its output channels last."""
        return self.linear_layer.kernel

    def kernel_op(self, inputs, kernel):
        """The conv or matmul of `inputs` with a kernel like `kernel()`'s,
        without bias."""
        raise NotImplementedError

    def build(self, input_shape):
        self.linear_layer.build(input_shape)
        if self.bn is not None:
            self.bn.build(self.bn_input_shape(input_shape))
        if self.quantized and not self.weight_quantizer.built:  # built when loaded
            self.weight_quantizer.build(self.kernel().shape)
        # Keras freezes sub-layers when `trainable` changes, not when a layer
        # is made frozen: a frozen layer freezes its own now.
        for layer in (self.linear_layer, self.bn):
            if layer is not None and not self.trainable:
                layer.trainable = False
        if not self.linear_trainable:
            self.linear_layer.trainable = False

    def bn_input_shape(self, input_shape):
        """The shape of the BatchNorm's input: the linear layer's output."""
        return self.linear_layer.compute_output_shape(input_shape)

    def compute_output_shape(self, input_shape):
        return self.linear_layer.compute_output_shape(input_shape)

    def call(self, inputs, training=False, input_grid=None):
        if self.folded:
            outputs = bn_folding.folded_call(self, inputs, training, input_grid)
        elif self.quantized:
            outputs = self.quantized_linear(inputs, training, input_grid)
        else:
            outputs = self.linear_layer(inputs)
            if self.bn is not None:
                outputs = self.bn(outputs, training=training)
        return self.activation(outputs)

    def quantized_linear(self, inputs, training, input_grid):
        """The conv or matmul with the fake-quantized kernel, plus bias, and
        the unfolded BatchNorm if any.

        Without BatchNorm the bias is the integer kernel's: on the int32 grid
        `input_grid * weight scale` (see `bias_on_grid`). With an unfolded
        BatchNorm it stays float (TFLite folds the BatchNorm into it later),
        and a training BatchNorm, which cancels it, is computed without it
        (`batch_norm.train_without_bias`).
        """
        weights = self.weight_quantizer.quantize_weights(self.kernel(), training)
        outputs = self.kernel_op(inputs, tf.cast(weights.values, inputs.dtype))
        use_bias = self.linear_layer.use_bias
        bias = self.linear_layer.bias if use_bias else None
        if self.bn is None:
            if not use_bias:
                return outputs
            bias = quantizers.bias_on_grid(bias, input_grid, weights.scale)
            return tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))
        if training and self.bn.trainable and use_bias:
            return batch_norm.train_without_bias(self.bn, outputs, bias)
        if use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))
        return self.bn(outputs, training=training)

    def copy_weights_from(self, source):
        """Copies the weights of fusion layer `source` (same kind and shape)
        into this one: the linear layer's and the BatchNorm's."""
        if source.bn is not None and self.bn is None:
            raise ValueError(
                f"Cannot copy the BatchNorm weights (bn/gamma, bn/beta, ...) of "
                f"'{source.name}' into {self.__class__.__name__} '{self.name}', "
                "which has no BatchNorm (has_bn=False)."
            )
        self.linear_layer.set_weights(source.linear_layer.get_weights())
        if source.bn is not None:
            self.bn.set_weights(source.bn.get_weights())

    def get_config(self):
        config = super().get_config()
        linear = self.linear_layer.get_config()
        config.update({k: v for k, v in linear.items() if k not in _NOT_FORWARDED})
        config.update(self._bn_config)
        config.update(has_bn=self.has_bn, activation=keras.activations.serialize(self.activation))
        if self.quantized:
            config["weight_quantizer"] = keras.saving.serialize_keras_object(self.weight_quantizer)
        if self.folded:
            config["freeze_bn"] = self.freeze_bn
        if not self.linear_trainable:
            config["linear_trainable"] = False
        return config


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


@keras.saving.register_keras_serializable(package="keras_qat")
class DenseBnAct(FusionLayer):
    """Densely-connected layer, optional BatchNormalization and activation.

    A drop-in for `keras.layers.Dense` (followed by `BatchNormalization` when
    `has_bn=True`), and the unit that `convert_quant_network` quantizes. The
    matmul is a `keras.layers.Dense` sub-layer named `dense`, the BatchNorm a
    `keras.layers.BatchNormalization` named `bn`.

    Args:
        units, use_bias, kernel_initializer, bias_initializer,
            kernel_regularizer, bias_regularizer, kernel_constraint,
            bias_constraint: As in `keras.layers.Dense`.
        activation: Activation applied last (see `Conv2DBnAct`).
        activity_regularizer: Regularizer of the layer's output.
        has_bn: Whether a BatchNormalization follows the matmul.
        **kwargs: BatchNormalization arguments and base layer keyword
            arguments (see `Conv2DBnAct`).

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
        self.dense = keras.layers.Dense(
            units,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            dtype=self.dtype_policy,
            name="dense",
        )
        self._as_conv = False  # True while traced for export as a 1x1 conv

    @property
    def linear_layer(self):
        return self.dense

    def kernel(self):
        kernel = self.dense.kernel
        if self._as_conv:
            return tf.reshape(kernel, [1, 1] + list(kernel.shape))
        return kernel

    def kernel_op(self, inputs, kernel):
        if kernel.shape.rank == 4:  # (1, 1, in, out): as a 1x1 convolution
            return tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID")
        return keras.ops.matmul(inputs, kernel)

    def bn_input_shape(self, input_shape):
        """A quantized layer's BatchNorm sees the flattened `(n, units)`
        output (see `call`)."""
        shape = self.dense.compute_output_shape(input_shape)
        return shape if not self.quantized else (None, shape[-1])

    def build(self, input_shape):
        super().build(input_shape)
        if self.quantized and self.bn is not None:
            # Traced for export as a 1x1 conv, the BatchNorm (inference: the
            # moving statistics, per last axis) normalizes `(n, 1, 1, units)`.
            units = self.dense.units
            self.bn.input_spec = keras.InputSpec(min_ndim=2, axes={-1: units})

    def call(self, inputs, training=False, input_grid=None):
        """As `FusionLayer.call`. A quantized layer runs on inputs flattened
        to `(n, in)` (traced for export with per-channel weights, `(n, 1, 1,
        in)`: a 1x1 convolution), bias, BatchNorm and activation included,
        and reshapes the result back.

        On more than 2D inputs Keras' matmul is a Tensordot, whose bias add
        comes after a reshape, where the converter leaves it in float; on
        2D inputs the converter fuses it into an int8 FULLY_CONNECTED. It
        turns a MatMul with per-channel fake-quantized weights into a
        transpose whose quantized axis does not match, but converts a 1x1
        Conv2D with per-output-channel weights into an int8 CONV_2D; the
        kernel is reshaped to `(1, 1, in, out)` before it is quantized, so
        its quantized axis is the last one throughout.
        """
        self._as_conv = (
            self.quantized
            and self.weight_quantizer.per_channel
            and not training
            and is_tracing_for_export()
        )
        if not self.quantized or (inputs.shape.rank == 2 and not self._as_conv):
            return super().call(inputs, training=training, input_grid=input_grid)
        in_units, units = self.dense.kernel.shape
        flat = tf.reshape(inputs, [-1, 1, 1, in_units] if self._as_conv else [-1, in_units])
        outputs = super().call(flat, training=training, input_grid=input_grid)
        middle = list(inputs.shape[1:-1])
        if all(size is not None for size in middle):  # a static shape: no shape ops
            return tf.reshape(outputs, [-1] + middle + [units])
        return tf.reshape(outputs, tf.concat([tf.shape(inputs)[:-1], [units]], 0))


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
