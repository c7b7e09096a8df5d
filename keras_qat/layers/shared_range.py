"""Layers whose inputs and output share one quantization range.

TFLite requires one scale for all operands of a CONCATENATION, and its int8
AVERAGE_POOL_2D writes its output on its input's grid. These layers keep
that one range in a `FakeQuant` sub-layer named `quantizer`, and quantize
with it where the integer model does. Like a `FakeQuant`, called with
`return_scale=True` they also return their output's grid, for the int32 bias
of a quantized layer that consumes it.
"""

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.layers.call_context import is_tracing_for_export
from keras_qat.layers.fake_quant import FakeQuant, with_scale_spec
from keras_qat.requantization import requantized


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConcatenate(keras.layers.Concatenate):
    """`Concatenate` whose inputs and output share one quantization range.

    An integer concatenation writes every input on the output's grid. This
    layer learns that range from the concatenated values, and quantizes with
    it the inputs listed in `quantize_inputs` (by default all) and the
    output.

    `convert_quant_network` lists the inputs that have no `FakeQuant` of
    their own: an integer op writes those directly on the concatenation's
    grid. An input that is already fake-quantized (because other layers use
    it too) is left as it is and is requantized by the output's
    quantization, as the integer model requantizes it; quantizing it here
    as well would put two fake-quant ops in a row, which the TFLite
    converter does not translate faithfully.

    Args:
        axis: Concatenation axis.
        quantize_inputs: `None` (all inputs) or one boolean per input.
        quantizer: The shared range: a `FakeQuant`, a dict of its options,
            or None for the defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantConcatenate(axis=-1)
    >>> y = layer([np.ones((2, 3)), -np.ones((2, 2))], training=True)
    >>> float(layer.quantizer.min.numpy()), float(layer.quantizer.max.numpy())
    (-1.0, 1.0)
    """

    def __init__(self, axis=-1, quantize_inputs=None, quantizer=None, **kwargs):
        super().__init__(axis=axis, **kwargs)
        if quantize_inputs is not None:
            quantize_inputs = [bool(flag) for flag in quantize_inputs]
        self.quantize_inputs = quantize_inputs
        self.quantizer = FakeQuant.get(quantizer, "quantizer")

    def build(self, input_shape):
        if self.quantize_inputs is not None and len(self.quantize_inputs) != len(input_shape):
            raise ValueError(
                f"`quantize_inputs` has {len(self.quantize_inputs)} entries for "
                f"{len(input_shape)} inputs. Received: "
                f"quantize_inputs={self.quantize_inputs}"
            )
        super().build(input_shape)
        if not self.quantizer.built:  # built when loaded
            self.quantizer.build(self.compute_output_shape(input_shape))

    def call(self, inputs, training=False, return_scale=False, onto_grid=False, input_scales=None):
        if onto_grid:
            return self._onto_grid(inputs, training, return_scale, input_scales)
        quantizer = self.quantizer
        flags = self.input_flags(len(inputs))
        min_val, max_val, active = quantizer.observe(super().call(inputs), training)
        inputs = [
            quantizer.quantize_with(x, min_val, max_val, active, training) if flag else x
            for x, flag in zip(inputs, flags)
        ]
        if input_scales is not None and self._requantizes_as_xnnpack():
            scale = quantizer.output_scale(min_val, max_val, active)
            inputs = self._requantized(inputs, flags, input_scales, scale)
        outputs = super().call(inputs)
        if not all(flags):  # else already on the shared grid
            outputs = quantizer.quantize_with(outputs, min_val, max_val, active, training)
        if return_scale:
            return outputs, quantizer.output_scale(min_val, max_val, active)
        return outputs

    def input_flags(self, count):
        """Whether each of `count` inputs is quantized here (True) or keeps a
        grid of its own, to be requantized onto the shared one (False)."""
        return self.quantize_inputs or [True] * count

    def _requantizes_as_xnnpack(self):
        """Whether inputs on other grids are requantized as XNNPACK's int8
        QUANTIZE does it: on grids of 8 bits or fewer (stored as int8), and
        not while traced for export (the converter puts the QUANTIZE)."""
        return self.quantizer.num_bits <= 8 and not is_tracing_for_export()

    def _requantized(self, inputs, flags, input_scales, scale):
        """The inputs that keep grids of their own (not in `quantize_inputs`)
        moved onto the shared grid of step `scale` as XNNPACK's int8
        QUANTIZE moves them (`keras_qat.requantization`): `input_scales`
        holds their grids' steps, in order."""
        scales = iter(input_scales)
        return [
            x if flag else requantized(x, next(scales), scale) for x, flag in zip(inputs, flags)
        ]

    def _onto_grid(self, x, training, return_scale, input_scales=None):
        """`x` (one tensor) on the shared grid as it stands, neither
        observed nor counted as a call: the pooled (or otherwise
        grid-keeping) result that this concatenation and other layers read,
        which TFLite's converter puts on the concatenation's grid for all of
        them (CONCATENATION's same-scale constraint reaches back to it; the
        other readers then see it requantized). In training the range is the
        one stored before this step's concatenation updates it. With
        `input_scales` (`[step of x's grid]`), `x` is requantized as XNNPACK
        does it."""
        quantizer = self.quantizer
        active = quantizer.stored_range_active()
        low, high = quantizer.min, quantizer.max
        if input_scales is not None and self._requantizes_as_xnnpack():
            x = requantized(x, input_scales[0], quantizer.output_scale(low, high, active))
        outputs = quantizer.quantize_with(x, low, high, active, training)
        if return_scale:
            return outputs, quantizer.output_scale(low, high, active)
        return outputs

    def quantizers(self):
        """`{"output": quantizer}`: the shared range (`keras_qat.quantizer_roles`)."""
        return {"output": self.quantizer}

    def compute_output_spec(
        self, inputs, training=False, return_scale=False, onto_grid=False, input_scales=None
    ):
        if onto_grid:
            return with_scale_spec(keras.KerasTensor(inputs.shape, inputs.dtype), return_scale)
        return with_scale_spec(super().compute_output_spec(inputs), return_scale)

    def get_config(self):
        config = super().get_config()
        config["quantize_inputs"] = self.quantize_inputs
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config


def pool_on_shared_grid(layer, pool, inputs, training, return_scale):
    """What a shared-range average pooling computes: `pool` (the Keras
    layer's average) of its input quantized with `layer.quantizer`, rounded
    to the same grid as the int8 kernel rounds it (the output's scale too
    with `return_scale`)."""
    quantizer = layer.quantizer
    min_val, max_val, active = quantizer.observe(inputs, training)
    pooled = pool(quantizer.quantize_with(inputs, min_val, max_val, active, training))
    if is_tracing_for_export():  # the converter reads the range from a fake quant
        outputs = quantizer.quantize_with(pooled, min_val, max_val, active)
    else:
        outputs = pooled if active is False else round_average(quantizer, pooled, min_val, max_val)
        if active is not True and active is not False:
            outputs = tf.where(active, outputs, pooled)
    if return_scale:
        return outputs, quantizer.output_scale(min_val, max_val, active)
    return outputs


def round_average(quantizer, pooled, min_val, max_val):
    """`pooled` (averages of on-grid values) rounded to the grid half away
    from zero in signed integers, as int8 AVERAGE_POOL_2D rounds;
    straight-through gradient."""
    low, high = quantizers.quant_range(min_val, max_val, quantizer.symmetric)
    nudged_min, _, scale = quantizers.nudged_range(
        low, high, quantizer.num_bits, quantizer.narrow_range
    )
    offset = 2.0 ** (quantizer.num_bits - 1)  # level -> signed integer
    signed = (tf.cast(pooled, tf.float32) - nudged_min) / scale - offset
    # Averages are multiples of 1 / window size: only ties lie within
    # 1e-3 of a half, and float error must not move them below it.
    rounded = quantizers.round_half_away_from_zero(signed, tie_tolerance=1e-3)
    on_grid = tf.cast((rounded + offset) * scale + nudged_min, pooled.dtype)
    return pooled + tf.stop_gradient(on_grid - pooled)


class SharedRangePooling:
    """What the shared-range average poolings add to Keras' layer (the
    class before it in their bases): a `quantizer` holding the shared range,
    and `pool_on_shared_grid` as their call."""

    def __init__(
        self,
        pool_size,
        strides=None,
        padding="valid",
        data_format=None,
        quantizer=None,
        **kwargs,
    ):
        super().__init__(
            pool_size, strides=strides, padding=padding, data_format=data_format, **kwargs
        )
        self.quantizer = FakeQuant.get(quantizer, "quantizer")
        self.built = False  # some Keras releases build stateless pooling layers at once

    def build(self, input_shape):
        super().build(input_shape)
        if not self.quantizer.built:  # built when loaded
            self.quantizer.build(input_shape)

    def call(self, inputs, training=False, return_scale=False):
        return pool_on_shared_grid(self, super().call, inputs, training, return_scale)

    def unquantized_output(self, inputs):
        """The average of `inputs`, not rounded."""
        return super().call(inputs)

    def quantizers(self):
        """`{"output": quantizer}`: the shared range (`keras_qat.quantizer_roles`)."""
        return {"output": self.quantizer}

    def compute_output_spec(self, inputs, training=False, return_scale=False):
        return with_scale_spec(super().compute_output_spec(inputs), return_scale)

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantAveragePooling2D(SharedRangePooling, keras.layers.AveragePooling2D):
    """`AveragePooling2D` whose input and output share one range.

    TFLite's int8 AVERAGE_POOL_2D writes its output on its input's grid
    (same scale and zero point), so the average is rounded to that grid.
    This layer learns the range from its input, quantizes the input with it
    (its producer then needs no `FakeQuant` of its own) and rounds the
    average to the same grid as the int8 kernel does: half away from zero in
    signed integers (XNNPACK, TFLite's default CPU path; rounding half up,
    as a FakeQuant does, differs on the ties that 2x2 windows produce a
    quarter of the time). `convert_quant_network` uses it where the pooled
    tensor has no other consumer.

    Args:
        pool_size, strides, padding, data_format: As in `AveragePooling2D`.
        quantizer: The shared range: a `FakeQuant`, a dict of its options,
            or None for the defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantAveragePooling2D(2)
    >>> y = layer(np.ones((1, 4, 4, 2), "float32"), training=True)
    >>> y.shape
    TensorShape([1, 2, 2, 2])
    """


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantAveragePooling1D(SharedRangePooling, keras.layers.AveragePooling1D):
    """`AveragePooling1D` whose input and output share one range.

    In the int8 model a 1D average pooling is an AVERAGE_POOL_2D between
    reshapes, which rounds as `QuantAveragePooling2D` describes.

    Args:
        pool_size, strides, padding, data_format: As in `AveragePooling1D`.
        quantizer: The shared range: a `FakeQuant`, a dict of its options,
            or None for the defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantAveragePooling1D(2)
    >>> layer(np.ones((1, 6, 3), "float32"), training=True).shape
    TensorShape([1, 3, 3])
    """
