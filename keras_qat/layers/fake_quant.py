"""`FakeQuant`: one activation range, learned from training batches."""

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.config import (
    DEFAULT_EMA_DECAY,
    DEFAULT_NUM_BITS,
    check_bool,
    check_fraction,
    check_int,
)
from keras_qat.layers.call_context import calibration_method, is_bypassed, is_tracing_for_export
from keras_qat.layers.quantizer import Quantizer, across_replicas
from keras_qat.requantization import from_float as from_float_rounded
from keras_qat.requantization import multiplied
from keras_qat.tflite_rsqrt import rounded_rsqrt


@keras.saving.register_keras_serializable(package="keras_qat")
class FakeQuant(Quantizer):
    """Fake-quantizes its input with a range learned from training batches.

    The range lives in non-trainable variables (`min`, `max`; scalars, or one
    value per channel) next to a step counter `step`, all saved with the
    model. In a training call the layer first updates the range from the
    batch and then quantizes with it:

    - the first training batch sets the range to the batch's min / max;
    - later batches update it by moving average,
      `range = ema_decay * range + (1 - ema_decay) * batch_range`, or replace
      it with the batch range when `ema=False`;
    - the range always contains 0, and non-finite values never reach it.

    Under a `tf.distribute` strategy the batch min / max are reduced across
    replicas before the update, so every replica holds the range a single
    device would compute from the global batch; the range variables and the
    step counter use `only_first_replica` aggregation, so the step advances
    once per global step.

    Until `quant_delay` training steps have passed, the output is the input
    unchanged (the range still learns). In inference the stored range is
    used; a layer that has not yet seen a training batch has no range and
    passes its input through.

    With `fixed_range=(min, max)` the range is that one, always: for outputs
    whose integer kernels fix their range, such as sigmoid (`[0, 255/256]`,
    TFLite's scale 1/256) and tanh (`[-1, 127/128]`, scale 1/128).

    With `activation="relu"` or `"relu6"` the layer quantizes
    `activation(inputs)`: the activation that an integer kernel fuses into
    the op before it, as the clamp it is there. The range is learned from the
    activation's output. In training the two are one op whose backward pass
    keeps a boolean mask instead of two float tensors
    (`quantizers.fake_quant_for_training`): `convert_quant_network` moves a
    fused ReLU / ReLU6 into the `FakeQuant` after it for that.

    Called with `return_scale=True`, the layer also returns its *grid*: the
    step of the output's grid (a float32 scalar) when this call quantized,
    else 0. A quantized layer that consumes the output takes it as its
    `input_scale`, to add its bias on the integer kernel's int32 grid.

    Called with `operand_scales=[scale_a, scale_b]` (the grids of the two
    operands of the multiplication whose result it rounds, as
    `convert_quant_network` calls the `FakeQuant` after a `Multiply`, a `*`
    of two tensors or a swish), a grid of 8 bits or fewer rounds the product
    as TFLite's int8 MUL does (`keras_qat.requantization.multiplied`): from
    the exact product of the operands' levels, ties to even.

    Called with `from_float=True` (as `convert_quant_network` calls the
    `FakeQuant` of a float model input), a grid of 8 bits or fewer rounds
    as TFLite's int8 QUANTIZE of a float tensor does
    (`keras_qat.requantization.from_float`: times the float32 reciprocal of
    the scale, ties to even). Called with `rsqrt_of=(values, scale)`, where
    its input is `rsqrt(values)` and `values` lie on the grid of step
    `scale` (a layer normalization's inverse standard deviation), it rounds
    as TFLite's int8 RSQRT kernel does (`keras_qat.tflite_rsqrt`).

    Args:
        num_bits: Bit width, an integer in `[2, 16]`.
        symmetric: Whether the range is symmetric around zero.
        narrow_range: Whether the grid is `[1, 2**num_bits - 1]`.
        per_channel: Whether to keep one range per channel along `axis`.
        axis: The channel axis when `per_channel=True`.
        ema: Whether to update the range by moving average (else the range
            is the last batch's).
        ema_decay: The moving-average decay, in `[0, 1)`.
        quant_delay: Number of training steps before quantization starts.
        fixed_range: `None` to learn the range, or a finite `(min, max)` pair
            with `min <= 0 <= max`, `min < max`, that is used as it is.
        activation: `None`, `"relu"` or `"relu6"`: an activation applied
            before quantizing, fused as integer kernels fuse it.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        Any shape; with `per_channel=True`, the size along `axis` must be
        known.

    Output shape:
        Same as the input (and a scalar grid with `return_scale=True`).

    Raises:
        ValueError: for an invalid argument.

    Example:

    >>> fq = FakeQuant(num_bits=8)
    >>> x = tf.constant([[-1.0, 0.5, 2.0]])
    >>> y = fq(x, training=True)   # sets the range to [-1, 2]
    >>> float(fq.min.numpy()), float(fq.max.numpy())
    (-1.0, 2.0)
    """

    def __init__(
        self,
        num_bits=DEFAULT_NUM_BITS,
        symmetric=False,
        narrow_range=False,
        per_channel=False,
        axis=-1,
        ema=True,
        ema_decay=DEFAULT_EMA_DECAY,
        quant_delay=0,
        fixed_range=None,
        activation=None,
        **kwargs,
    ):
        super().__init__(
            num_bits=num_bits,
            symmetric=symmetric,
            narrow_range=narrow_range,
            per_channel=per_channel,
            quant_delay=quant_delay,
            **kwargs,
        )
        self.axis = check_int("axis", axis, minimum=-(2**31))
        self.ema = check_bool("ema", ema)
        self.ema_decay = check_fraction("ema_decay", ema_decay)
        self.fixed_range = _check_fixed_range(fixed_range, self.per_channel)
        self.activation = _check_activation(activation)
        self.supports_masking = True

    def build(self, input_shape):
        shape = ()
        self._reduce_axes = None
        if self.per_channel:
            rank = len(input_shape)
            if not -rank <= self.axis < rank or input_shape[self.axis] is None:
                raise ValueError(
                    f"`FakeQuant(per_channel=True, axis={self.axis})` needs "
                    "an input whose size along `axis` is known. "
                    f"Received: input_shape={input_shape}"
                )
            shape = (input_shape[self.axis],)
            self._reduce_axes = [d for d in range(rank) if d != self.axis % rank]
        low, high = self.fixed_range or (0.0, 0.0)
        self.min, self.max = (
            self.add_weight(
                name=name,
                shape=shape,
                initializer=keras.initializers.Constant(value),
                dtype="float32",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )
            for name, value in (("min", low), ("max", high))
        )
        self.add_step_counter()

    def has_range(self):
        """Whether a range has been learned: not still `[0, 0]` (the initial
        value, also what an all-zero or empty batch gives)."""
        return tf.reduce_any(tf.not_equal(self.min, self.max))

    def update_range(self, x, running_min_max=False):
        """Updates the range from batch `x`; returns the new `(min, max)`.

        The first batch with a non-empty range sets it, later ones update it
        by moving average (or, with `running_min_max`, widen it to their min
        and max). A batch (or, per channel, a channel) with a non-finite
        value leaves it as it is.
        """
        if self.fixed_range is not None:
            return self.min, self.max
        # A statistic of the batch, not a function to differentiate: without
        # stop_gradient the fake quant's range gradient would flow back
        # through the min / max into x, at the cost of two more passes.
        batch_range = self._batch_range(x)
        batch_min, batch_max = across_replicas(*(tf.stop_gradient(v) for v in batch_range))
        finite = tf.logical_and(tf.math.is_finite(batch_min), tf.math.is_finite(batch_max))
        # Each variable is read once: every use of a Keras variable is a
        # read op of its own, and this runs for every quantizer and step.
        low, high = tf.convert_to_tensor(self.min), tf.convert_to_tensor(self.max)
        first = tf.equal(low, high)  # still [0, 0]: the range contains 0
        updated = []
        for variable, old, value, widest in (
            (self.min, low, batch_min, tf.minimum),
            (self.max, high, batch_max, tf.maximum),
        ):
            if running_min_max:
                value = tf.where(first, value, widest(old, value))
            elif self.ema:
                decay = self.ema_decay
                value = tf.where(first, value, decay * old + (1.0 - decay) * value)
            updated.append(tf.where(finite, value, old))
            variable.assign(updated[-1])
        return tuple(updated)

    def calibrate_range(self, x, method):
        """Updates the range from batch `x` in calibration (`method`:
        `"min_max"` or `"moving_average"`, see `keras_qat.calibrate`)."""
        self.update_range(x, running_min_max=method == "min_max")

    def reset_range(self):
        """Back to no range (`[0, 0]`), unless the range is fixed."""
        if self.fixed_range is None:
            self.min.assign(tf.zeros_like(self.min))
            self.max.assign(tf.zeros_like(self.max))

    def _batch_range(self, x):
        """`(min, max)` of the batch as this layer quantizes it: of
        `activation(x)`, whose min is 0 (so only the max is reduced)."""
        if self.activation is None:
            return quantizers.batch_range(x, self._reduce_axes)
        high = tf.maximum(tf.reduce_max(tf.cast(x, tf.float32), self._reduce_axes), 0.0)
        upper = quantizers.FUSED_CLAMPS[self.activation][1]
        high = high if upper is None else tf.minimum(high, upper)
        return tf.zeros_like(high), high

    def observe(self, inputs, training=False):
        """Returns `(min, max, active)` for quantizing this call's inputs.

        A training call first updates the range from `inputs` and counts a
        step; an inference call while calibrating (`call_context.calibrating`)
        updates the range and passes `inputs` through. `active` is a boolean
        tensor (quantize, or pass through during the quant delay, or in
        inference while there is no range), or Python `True` while the model
        is traced for export and in training calls without a quant delay.
        """
        if training:
            min_val, max_val = self.update_range(inputs)
            return min_val, max_val, self.advance(training)
        method = calibration_method()
        if method is not None:
            self.calibrate_range(inputs, method)
            return self.min, self.max, False
        active = self.advance(training)
        if active is not True and active is not False and self.fixed_range is None:
            active = tf.logical_and(active, self.has_range())
        return self.min, self.max, active

    def stored_range_active(self):
        """Whether the stored range quantizes now, for a call that neither
        observes values nor counts as a call: past the quant delay with a
        range (Python `True` while traced for export, `False` while
        bypassed or calibrating)."""
        if is_tracing_for_export():
            return True
        if is_bypassed(self) or calibration_method() is not None:
            return False
        past_delay = self.steps() >= self.quant_delay
        return past_delay if self.fixed_range is not None else past_delay & self.has_range()

    def quantize_with(self, x, min_val, max_val, active, training=False):
        """Fake-quantizes `activation(x)` with the range from `observe` when
        `active` (else returns `activation(x)`); in training, per tensor, as
        one op with a light backward pass."""
        if training and not self.per_channel:

            def quantize():
                return quantizers.fake_quant_for_training(
                    x,
                    min_val,
                    max_val,
                    self.num_bits,
                    self.symmetric,
                    self.narrow_range,
                    self.activation,
                )

        else:

            def quantize():
                return self.fake_quant(self.activate(x), min_val, max_val, self.axis)

        if active is True:
            return quantize()
        if active is False:
            return self.activate(x)
        return tf.cond(active, quantize, lambda: tf.identity(self.activate(x)))

    def activate(self, x):
        """`x` through this layer's fused activation, if any."""
        return quantizers.fused_activation(x, self.activation)

    def output_scale(self, min_val, max_val, active):
        """The step of the output grid when `active`, else 0 (float32)."""
        if self.per_channel:
            raise ValueError(
                f"FakeQuant '{self.name}' is per channel: its output has no "
                "single grid for a layer's int32 bias. Received: "
                "return_scale=True"
            )
        if active is False:
            return tf.zeros(())
        scale = self.grid_scale(min_val, max_val)
        return scale if active is True else tf.where(active, scale, 0.0)

    def call(
        self,
        inputs,
        training=False,
        return_scale=False,
        operand_scales=None,
        from_float=False,
        rsqrt_of=None,
    ):
        min_val, max_val, active = self.observe(inputs, training)
        kernel_rounding = operand_scales is not None or from_float or rsqrt_of is not None
        if kernel_rounding and self._rounds_as_int8_kernels():
            output_scale = self.output_scale(min_val, max_val, active)
            if operand_scales is not None:
                inputs = multiplied(inputs, operand_scales, output_scale)
            elif from_float:
                inputs = from_float_rounded(inputs, output_scale)
            else:
                inputs = rounded_rsqrt(inputs, *rsqrt_of, output_scale)
        outputs = self.quantize_with(inputs, min_val, max_val, active, training)
        if return_scale:
            return outputs, self.output_scale(min_val, max_val, active)
        return outputs

    def _rounds_as_int8_kernels(self):
        """Whether a product, a float input or an inverse square root is
        rounded as TFLite's int8 MUL, QUANTIZE or RSQRT rounds it: on one
        grid (per tensor) of 8 bits or fewer (stored as int8), and not while
        traced for export (the converter reads the range)."""
        return not self.per_channel and self.num_bits <= 8 and not is_tracing_for_export()

    def quantizers(self):
        """`{"output": self}`: a `FakeQuant` is its output's grid."""
        return {"output": self}

    def unquantized_output(self, inputs):
        """What the layer computes from `inputs` before it rounds."""
        return self.activate(inputs)

    def compute_output_spec(self, inputs, training=False, return_scale=False, **rounding):
        return with_scale_spec(keras.KerasTensor(inputs.shape, inputs.dtype), return_scale)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            axis=self.axis,
            ema=self.ema,
            ema_decay=self.ema_decay,
            fixed_range=self.fixed_range,
            activation=self.activation,
        )
        return config


def with_scale_spec(outputs, return_scale):
    """`outputs`, and with `return_scale` the spec of a scalar grid: the
    output spec of a layer called with `return_scale`."""
    if return_scale:
        return outputs, keras.KerasTensor((), "float32")
    return outputs


def _check_activation(activation):
    """Returns `activation` if it is None or a fused activation's name."""
    if activation is None or activation in quantizers.FUSED_CLAMPS:
        return activation
    raise ValueError(
        "Received an invalid value for `activation`, expected None or one of "
        f"{sorted(quantizers.FUSED_CLAMPS)} (the activations integer kernels fuse). "
        f"Received: activation={activation!r}"
    )


def _check_fixed_range(fixed_range, per_channel):
    """Returns `fixed_range` as a pair of Python floats, or None."""
    if fixed_range is None:
        return None
    try:
        low, high = (float(value) for value in fixed_range)
        valid = low <= 0.0 <= high and low < high and abs(high - low) < float("inf")
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            "Received an invalid value for `fixed_range`, expected None or a "
            "pair (min, max) of finite numbers with min <= 0 <= max and "
            f"min < max. Received: fixed_range={fixed_range!r}"
        )
    if per_channel:
        raise ValueError(
            "`fixed_range` is one range for the whole tensor; it cannot be "
            "used with per_channel=True. Received: per_channel=True"
        )
    return (low, high)
