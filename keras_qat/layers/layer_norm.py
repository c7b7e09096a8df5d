"""`QuantLayerNormalization`: layer normalization as TFLite's int8 ops.

An int8 TFLite model has no layer-normalization kernel: the converter
lowers it to MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL and ADD, each an int8
op that rounds its result onto a grid of its own. This layer computes layer
normalization as those ops and fake-quantizes every intermediate result with
a `FakeQuant` of its own (sub-layers named after the stage, `mean_quant`,
...), so that the converter finds a range for each and the Keras model
rounds where the integer model rounds. `gamma` and `beta` are constants of
the integer model, fake-quantized per tensor by `WeightQuantizer`s. The
output's `FakeQuant` is the one `convert_quant_network` places after the
layer.

With 16-bit activations (TFLite's 16x8 mode) `gamma` and `beta` are
operands of int16 ops and so take 16 bits too (`convert_quant_network` sets
that), and the constants are subtracted (`x - (-beta)`, `variance -
(-epsilon)`): TF 2.21's 16x8 converter fails on an ADD with a constant
operand ("element type needs to match") and takes a SUB.
"""

import keras
import tensorflow as tf

from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.weight_quantizer import WeightQuantizer

# The intermediate results that the integer model rounds, in order (the
# last op's result is rounded by the FakeQuant after the layer).
STAGES = ("mean", "centred", "square", "variance", "variance_eps", "inverse_std")


def stages(scale, center):
    """The rounded stages of a layer normalization with or without
    `gamma` (`scale`) and `beta` (`center`)."""
    return (
        STAGES
        + (("normalized",) if scale or center else ())
        + (("scaled",) if scale and center else ())
    )


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantLayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis, computed as
    TFLite's int8 ops with each intermediate result fake-quantized.

    `(x - mean) * rsqrt(variance + epsilon) * gamma + beta`, with `mean` and
    `variance` over the last axis: the mean, the centred input, its square,
    the variance, `variance + epsilon`, its inverse square root, the
    normalized input and (with `scale` and `center`) its product with
    `gamma` are each fake-quantized by their own `FakeQuant` (`<stage>_quant`
    sub-layers, options from `quantizer`); the last op's result is left to
    the `FakeQuant` after the layer. Until the quant delay has passed, the output
    equals Keras' layer normalization to float rounding.

    Args:
        axis, epsilon, center, scale, beta_initializer, gamma_initializer,
            beta_regularizer, gamma_regularizer, beta_constraint,
            gamma_constraint: As in `keras.layers.LayerNormalization`
            (`axis` must be the last axis; `rms_scaling` is not taken).
        quantizer: Options of the intermediate `FakeQuant`s (a dict), or
            None for the defaults.
        weight_quantizer: Options of the `WeightQuantizer`s of `gamma` and
            `beta` (a dict, per tensor), or None for the defaults
            (symmetric, narrow range).
        **kwargs: Base layer keyword arguments, such as `name`.

    Raises:
        ValueError: for an axis other than the last, `rms_scaling=True`, or
            per-channel options.

    Example:

    >>> layer = QuantLayerNormalization()
    >>> layer(np.ones((2, 3, 4), "float32"), training=True).shape
    TensorShape([2, 3, 4])
    """

    def __init__(self, quantizer=None, weight_quantizer=None, **kwargs):
        super().__init__(**kwargs)
        axis = self.axis if isinstance(self.axis, int) else list(self.axis)
        if axis not in (-1, [-1]) or self.rms_scaling:
            raise ValueError(
                "QuantLayerNormalization normalizes over the last axis only, "
                f"without rms_scaling. Received: axis={self.axis}, "
                f"rms_scaling={self.rms_scaling}"
            )
        self.quantizer = dict(quantizer or {})
        weight_options = dict(symmetric=True, narrow_range=True)
        weight_options.update(weight_quantizer or {})
        if self.quantizer.get("per_channel") or weight_options.get("per_channel"):
            raise ValueError(
                "QuantLayerNormalization's ranges are per tensor (its int8 ops take one "
                f"scale). Received: quantizer={quantizer!r}, "
                f"weight_quantizer={weight_quantizer!r}"
            )
        self.weight_quantizer = weight_options
        self.stages = stages(self.scale, self.center)
        for stage in self.stages:
            setattr(self, f"{stage}_quant", FakeQuant(name=f"{stage}_quant", **self.quantizer))
        # Only the weights it has (`scale`, `center`) get a quantizer.
        self.gamma_quantizer = (
            WeightQuantizer(name="gamma_quantizer", **weight_options) if self.scale else None
        )
        self.beta_quantizer = (
            WeightQuantizer(name="beta_quantizer", **weight_options) if self.center else None
        )

    def build(self, input_shape):
        super().build(input_shape)
        reduced = tuple(input_shape[:-1]) + (1,)
        for stage in self.stages:
            quantizer = getattr(self, f"{stage}_quant")
            if not quantizer.built:  # built when loaded
                quantizer.build(reduced if stage in ("mean", "variance") else input_shape)
        for quantizer in (self.gamma_quantizer, self.beta_quantizer):
            if quantizer and not quantizer.built:
                quantizer.build((input_shape[-1],))

    def call(self, inputs, training=False):
        def rounded(stage, values, **kwargs):
            if stage not in self.stages:  # the FakeQuant after the layer rounds it
                return values
            return getattr(self, f"{stage}_quant")(values, training=training, **kwargs)

        x = tf.cast(inputs, tf.float32)
        mean = rounded("mean", tf.reduce_mean(x, -1, keepdims=True))
        centred = rounded("centred", x - mean)
        square = rounded("square", centred * centred)
        variance = rounded("variance", tf.reduce_mean(square, -1, keepdims=True))
        shifted, shifted_scale = rounded(
            "variance_eps", self._plus_epsilon(variance), return_scale=True
        )
        positive = self._positive(shifted, training)
        # Rounded as TFLite's int8 RSQRT kernel rounds it (in fixed point).
        inverse_std = rounded(
            "inverse_std", tf.math.rsqrt(positive), rsqrt_of=(positive, shifted_scale)
        )
        outputs = centred * inverse_std
        if self.scale or self.center:
            outputs = rounded("normalized", outputs)
        if self.scale:
            gamma = self.gamma_quantizer.quantize_weights(tf.cast(self.gamma, tf.float32), training)
            outputs = rounded("scaled", outputs * gamma.values)
        if self.center:
            outputs = self._plus_beta(outputs, training)
        return tf.cast(outputs, self.compute_dtype)

    @property
    def int16(self):
        """Whether its activations are 16-bit (TFLite's 16x8 mode)."""
        return self.quantizer.get("num_bits") == 16

    def _plus_epsilon(self, variance):
        if not self.int16:
            return variance + self.epsilon
        negated = tf.quantization.fake_quant_with_min_max_args(
            tf.constant(-self.epsilon), -2 * self.epsilon, 2 * self.epsilon, 16, True
        )
        return variance - negated

    def _plus_beta(self, outputs, training):
        beta = tf.cast(self.beta, tf.float32)
        if not self.int16:
            return outputs + self.beta_quantizer.quantize_weights(beta, training).values
        # A symmetric grid: the levels of -beta are those of beta, negated.
        return outputs - self.beta_quantizer.quantize_weights(-beta, training).values

    def _positive(self, shifted, training):
        """`variance + epsilon` as RSQRT takes it.

        Rounded, it can be 0 (a row of nearly equal values). TFLite's int8
        RSQRT then returns its largest output, and the Keras model does too
        in inference: `rsqrt(0)` is `inf`, which the `FakeQuant` after it
        clamps to its range's top. A training batch must stay finite for
        that `FakeQuant` to learn its range, so there a 0 counts as the
        grid's first step.
        """
        if not training:
            return shifted
        quantizer = self.variance_eps_quant
        step = tf.maximum(quantizer.grid_scale(quantizer.min, quantizer.max), self.epsilon)
        return tf.where(shifted > 0.0, shifted, step)

    def quantizers(self):
        """Its stages' `FakeQuant`s (`"intermediate/<stage>"`) and the
        `WeightQuantizer`s of the `gamma` and `beta` it uses
        (`"weights/gamma"`, `"weights/beta"`; `keras_qat.quantizer_roles`)."""
        roles = {f"intermediate/{s}": getattr(self, f"{s}_quant") for s in self.stages}
        if self.scale:
            roles["weights/gamma"] = self.gamma_quantizer
        if self.center:
            roles["weights/beta"] = self.beta_quantizer
        return roles

    def activation_operands(self):
        """The roles of weights that are operands of activation ops
        (`gamma` multiplies, `beta` is added): they take the activations'
        width (`keras_qat.export.checks`)."""
        return tuple(r for r in ("weights/gamma", "weights/beta") if r in self.quantizers())

    def quantized_weights(self):
        """`{"weights/gamma": gamma, "weights/beta": beta}`, float32, those it uses."""
        weights = {"weights/gamma": self.gamma, "weights/beta": self.beta}
        return {role: tf.cast(w, tf.float32) for role, w in weights.items() if w is not None}

    def copy_weights_from(self, source):
        """Copies `gamma` and `beta` of the float `LayerNormalization` `source`."""
        for name in ("gamma", "beta"):
            if getattr(source, name) is not None:
                getattr(self, name).assign(getattr(source, name))

    def get_config(self):
        config = super().get_config()
        config.pop("rms_scaling", None)
        config.update(quantizer=self.quantizer, weight_quantizer=self.weight_quantizer)
        return config
