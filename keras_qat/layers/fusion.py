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

from keras_qat import int8_rules, quantizers
from keras_qat.config import DEFAULT_FREEZE_BN, check_bool, check_int
from keras_qat.layers import batch_statistics, bn_folding
from keras_qat.layers.weight_quantizer import WeightQuantizer

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
) + int8_rules.KERAS_QUANTIZATION_ARGUMENTS


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
    """Base of the fusion layers: the BatchNorm, the activation, quantization.

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
    int4_storage = True  # the int8 op can store 4-bit weights as INT4 (pack_int4)
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
        self._init_quantization(weight_quantizer, freeze_bn)

    def _init_quantization(self, weight_quantizer, freeze_bn):
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

    def quantizers(self):
        """`{"weights/kernel": weight_quantizer}` for a quantized layer, `{}`
        for a float one (`keras_qat.quantizer_roles`)."""
        return {"weights/kernel": self.weight_quantizer} if self.quantized else {}

    def quantized_kernel(self):
        """The float32 kernel that the weight quantizer quantizes, output
        channels last: `W * gamma / sigma` (moving statistics) when folded."""
        if self.folded:
            return bn_folding.folded_kernel(self)
        return tf.cast(self.kernel(), tf.float32)

    def quantized_weights(self):
        """`{"weights/kernel": quantized_kernel()}` (see `quantizers`)."""
        return {"weights/kernel": self.quantized_kernel()} if self.quantized else {}

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

    def call(self, inputs, training=False, input_scale=None):
        if self.folded:
            outputs = bn_folding.folded_call(self, inputs, training, input_scale)
        elif self.quantized:
            outputs = self.quantized_linear(inputs, training, input_scale)
        else:
            outputs = self.linear_layer(inputs)
            if self.bn is not None:
                outputs = self.bn(outputs, training=training)
        return self.activation(outputs)

    def quantized_linear(self, inputs, training, input_scale):
        """The conv or matmul with the fake-quantized kernel, plus bias, and
        the unfolded BatchNorm if any.

        Without BatchNorm the bias is the integer kernel's: on the int32 grid
        `input_scale * weight scale` (see `bias_on_grid`). With an unfolded
        BatchNorm it stays float (TFLite folds the BatchNorm into it later),
        and a training BatchNorm, which cancels it, is computed without it
        (`batch_statistics.train_without_bias`).
        """
        weights = self.weight_quantizer.quantize_weights(
            self.kernel(), training, int4_storage=self.int4_storage
        )
        outputs = self.kernel_op(inputs, tf.cast(weights.values, inputs.dtype))
        use_bias = self.linear_layer.use_bias
        bias = self.linear_layer.bias if use_bias else None
        if self.bn is None:
            if not use_bias:
                return outputs
            bias = quantizers.bias_on_grid(bias, input_scale, weights.scale)
            return tf.nn.bias_add(outputs, tf.cast(bias, outputs.dtype))
        if training and self.bn.trainable and use_bias:
            return batch_statistics.train_without_bias(self.bn, outputs, bias)
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
