"""The two quantizers: `FakeQuant` (an activation's range) and
`WeightQuantizer` (a layer's weight range).

Both are layers, so that their state (ranges, step counters) is tracked,
saved and distributed like any other weight; both share `Quantizer`: the
grid options, their validation, the step counter and the quant delay.
"""

import collections

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.config import (
    DEFAULT_EMA_DECAY,
    DEFAULT_NUM_BITS,
    check_bool,
    check_fraction,
    check_int,
    check_num_bits,
)
from keras_qat.layers.modes import is_bypassed, is_tracing_for_export, packs_int4


def across_replicas(batch_min, batch_max):
    """The min of `batch_min` and max of `batch_max` over all replicas.

    Inside a `tf.distribute` strategy each replica sees its shard of the
    global batch; gathering the per-replica values and reducing them gives
    every replica the range that a single device computes from the whole
    batch (`tf.distribute.ReduceOp` has no MIN / MAX, hence `all_gather`).
    Outside a strategy, or with one replica, the values are returned as
    they are.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return batch_min, batch_max
    mins = context.all_gather(batch_min[None], axis=0)
    maxs = context.all_gather(batch_max[None], axis=0)
    return tf.reduce_min(mins, axis=0), tf.reduce_max(maxs, axis=0)


class Quantizer(keras.layers.Layer):
    """Base of the quantizers: grid options, step counter, quant delay.

    Args:
        num_bits: Bit width, an integer in `[2, 16]`.
        symmetric: Whether the range is symmetric around zero.
        narrow_range: Whether the grid is `[1, 2**num_bits - 1]`.
        per_channel: Whether to keep one range per channel.
        quant_delay: Number of training steps before quantization starts.
        calls_per_step: How many times the quantizer is called in one
            training step: a layer shared by `n` calls of a model counts `n`
            calls a step, and its delays count steps, not calls
            (`convert_quant_network` sets it from the model's graph).
        **kwargs: Base layer keyword arguments, such as `name`.
    """

    def __init__(
        self,
        num_bits=DEFAULT_NUM_BITS,
        symmetric=False,
        narrow_range=False,
        per_channel=False,
        quant_delay=0,
        calls_per_step=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_bits = check_num_bits(num_bits)
        self.symmetric = check_bool("symmetric", symmetric)
        self.narrow_range = check_bool("narrow_range", narrow_range)
        self.per_channel = check_bool("per_channel", per_channel)
        self.quant_delay = check_int("quant_delay", quant_delay)
        self.calls_per_step = check_int("calls_per_step", calls_per_step, minimum=1)

    def steps(self, calls=None):
        """Training steps so far (or in `calls` training calls)."""
        calls = self.step if calls is None else calls
        return calls if self.calls_per_step == 1 else calls // self.calls_per_step

    def add_step_counter(self):
        """Creates `step`, the number of training calls so far."""
        self.step = self.add_weight(
            name="step",
            shape=(),
            initializer="zeros",
            dtype="int64",
            trainable=False,
            aggregation="only_first_replica",
        )

    def count_call(self):
        """Adds 1 to `step`, as one op: the TensorFlow variable's own
        `assign_add` (Keras' `assign_add` is a read, an add and an assign)."""
        self.step.value.assign_add(1)

    def advance(self, training):
        """Counts a training call; returns whether this call quantizes.

        The result is Python `True` while the model is traced for export
        and in training calls without a quant delay (no run-time choice, so
        no control flow), Python `False` in inference while quantization is
        bypassed (`modes.quantization_bypassed`), else a boolean tensor: the
        delay has passed (counted before this call).
        """
        if training:
            if self.quant_delay == 0:
                self.count_call()
                return True
            before = tf.identity(self.step)
            self.count_call()
            return self.steps(before) >= self.quant_delay
        if is_tracing_for_export():
            return True
        if is_bypassed(self):
            return False
        return self.steps() >= self.quant_delay

    def fake_quant(self, x, min_val, max_val, axis=-1, clip_gradient=True):
        """`quantizers.fake_quant` with this quantizer's grid options."""
        return quantizers.fake_quant(
            x,
            min_val,
            max_val,
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            axis=axis if self.per_channel else None,
            clip_gradient=clip_gradient,
        )

    def grid_scale(self, min_val, max_val):
        """The step of this quantizer's grid for a range."""
        return quantizers.grid_scale(
            min_val, max_val, self.num_bits, self.symmetric, self.narrow_range
        )

    @classmethod
    def get(cls, identifier, argument="quantizer"):
        """An instance of this class from an instance, a config dict (its
        options, or a serialized quantizer) or None (the defaults)."""
        if identifier is None:
            return cls()
        if isinstance(identifier, dict):
            if "class_name" in identifier:
                identifier = keras.saving.deserialize_keras_object(identifier)
            else:
                return cls(**identifier)
        if isinstance(identifier, cls):
            return identifier
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected a "
            f"{cls.__name__}, a dict of its options or None. "
            f"Received: {argument}={identifier!r}"
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            per_channel=self.per_channel,
            quant_delay=self.quant_delay,
            calls_per_step=self.calls_per_step,
        )
        return config


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

    Called with `return_grid=True`, the layer also returns its *grid*: the
    step of the output's grid (a float32 scalar) when this call quantized,
    else 0. A quantized layer that consumes the output takes it as its
    `input_grid`, to add its bias on the integer kernel's int32 grid.

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
        Same as the input (and a scalar grid with `return_grid=True`).

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

    def update_range(self, x):
        """Updates the range from batch `x`; returns the new `(min, max)`.

        The first batch with a non-empty range sets it, later ones update it
        by moving average. A batch (or, per channel, a channel) with a
        non-finite value leaves it as it is.
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
        for variable, old, value in ((self.min, low, batch_min), (self.max, high, batch_max)):
            if self.ema:
                decay = self.ema_decay
                value = tf.where(first, value, decay * old + (1.0 - decay) * value)
            updated.append(tf.where(finite, value, old))
            variable.assign(updated[-1])
        return tuple(updated)

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
        step. `active` is a boolean tensor (quantize, or pass through during
        the quant delay, or in inference while there is no range), or Python
        `True` while the model is traced for export and in training calls
        without a quant delay.
        """
        if training:
            min_val, max_val = self.update_range(inputs)
            return min_val, max_val, self.advance(training)
        active = self.advance(training)
        if active is not True and active is not False and self.fixed_range is None:
            active = tf.logical_and(active, self.has_range())
        return self.min, self.max, active

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

    def grid(self, min_val, max_val, active):
        """The step of the output grid when `active`, else 0 (float32)."""
        if self.per_channel:
            raise ValueError(
                f"FakeQuant '{self.name}' is per channel: its output has no "
                "single grid for a layer's int32 bias. Received: "
                "return_grid=True"
            )
        if active is False:
            return tf.zeros(())
        scale = self.grid_scale(min_val, max_val)
        return scale if active is True else tf.where(active, scale, 0.0)

    def call(self, inputs, training=False, return_grid=False):
        min_val, max_val, active = self.observe(inputs, training)
        outputs = self.quantize_with(inputs, min_val, max_val, active, training)
        if return_grid:
            return outputs, self.grid(min_val, max_val, active)
        return outputs

    def compute_output_spec(self, inputs, training=False, return_grid=False):
        return with_grid_spec(keras.KerasTensor(inputs.shape, inputs.dtype), return_grid)

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


def with_grid_spec(outputs, return_grid):
    """`outputs`, and with `return_grid` the spec of a scalar grid: the
    output spec of a layer called with `return_grid`."""
    if return_grid:
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


QuantizedWeights = collections.namedtuple("QuantizedWeights", "values scale active")
QuantizedWeights.__doc__ = """A fake-quantized kernel.

`values` (the kernel, fake-quantized when `active`), `scale` (the grid
step, per output channel or not; 0 when not `active`, so that a bias rounded
to `input_grid * scale` stays float) and `active` (a boolean tensor, or
Python `True` / `False` where the answer is known when traced)."""


@keras.saving.register_keras_serializable(package="keras_qat")
class WeightQuantizer(Quantizer):
    """Fake-quantizes a layer's kernel with the kernel's own min / max.

    The range is taken from the kernel at every call (per output channel,
    the kernel's last axis, with `per_channel=True`), so it never goes stale
    and nothing but the step counter is stored. A quantized fusion layer
    owns one, as the sub-layer `weight_quantizer`, and passes it the kernel
    whose quantized version it applies (a folded kernel, for example).

    Args:
        num_bits: Bit width of the weights, an integer in `[2, 16]`.
        symmetric: Symmetric range; with `narrow_range=True` the signed grid
            `[-(2**(b-1) - 1), 2**(b-1) - 1] * scale` of TFLite's int8
            weights.
        narrow_range: Grid `[1, 2**num_bits - 1]`.
        per_channel: One range per output channel (the kernel's last axis).
        quant_delay: Training steps before the weights are quantized.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> quantizer = WeightQuantizer(num_bits=4, per_channel=True)
    >>> kernel = tf.constant([[0.5, -1.0], [1.0, 0.25]])
    >>> quantizer.build(kernel.shape)
    >>> quantizer.quantize_weights(kernel).values.shape
    TensorShape([2, 2])
    """

    def build(self, kernel_shape):
        self.add_step_counter()

    def range(self, kernel):
        """The range of `kernel` as `fake_quant` uses it, per output channel
        or not: its `(min, max)` made to contain 0, and with
        `symmetric=True` the `[-M, M]` of its largest magnitude `M`.

        An all-zero channel (or kernel) has no range of its own: it gets the
        widest channel's (or `[-1, 1]`). Its weights are 0 on any grid, and
        its bias then has an int32 grid like the other channels' (with a
        zero scale TFLite's bias would overflow and the integer model
        compute garbage).
        """
        # A statistic of the kernel, not differentiated (straight through, as
        # for activations): its gradient would cost more passes for nothing.
        kernel = tf.stop_gradient(tf.cast(kernel, tf.float32))
        axes = list(range(kernel.shape.rank - 1)) if self.per_channel else None
        if self.symmetric:  # the fewest ops: this runs for every layer and step
            bound = tf.reduce_max(tf.abs(kernel), axes)
            widest = tf.reduce_max(bound)
            widest = tf.where(tf.equal(widest, 0.0), 1.0, widest)
            bound = tf.where(tf.equal(bound, 0.0), widest, bound)
            return -bound, bound
        low, high = quantizers.quant_range(tf.reduce_min(kernel, axes), tf.reduce_max(kernel, axes))
        empty = tf.equal(low, high)
        fallback_low = tf.minimum(tf.reduce_min(low), -tf.reduce_max(high))
        fallback_low = tf.where(tf.equal(fallback_low, 0.0), -1.0, fallback_low)
        return tf.where(empty, fallback_low, low), tf.where(empty, -fallback_low, high)

    def quantize_weights(self, kernel, training=False):
        """Fake-quantizes `kernel` (float32) once the quant delay has passed.

        A training call counts a step. Kernels are small, so both versions
        are computed and one is selected (`tf.where`, not `tf.cond`): no
        control flow, and the gradient of the chosen one flows.

        Returns:
            `QuantizedWeights(values, scale, active)`.
        """
        active = self.advance(training)
        if active is False:
            return QuantizedWeights(kernel, tf.zeros(()), False)
        self.prepare(kernel, training)
        min_val, max_val = self.range(kernel)
        quantized = self.quantize_kernel(kernel, min_val, max_val, training)
        scale = self.grid_scale(min_val, max_val)
        if is_tracing_for_export() and not training:
            return QuantizedWeights(self._on_export_grid(quantized, scale), scale, True)
        if active is True:
            return QuantizedWeights(quantized, scale, True)
        return QuantizedWeights(
            tf.where(active, quantized, kernel), tf.where(active, scale, 0.0), active
        )

    def prepare(self, kernel, training):
        """Called before `range` in each call that quantizes (a hook for
        quantizers that keep state; nothing here)."""

    def quantize_kernel(self, kernel, min_val, max_val, training):
        """The fake-quantized kernel for its range (the kernel's own min /
        max): straight through for every weight, the extreme ones included,
        which the nudged range can round off by a float ulp (symmetric) or
        up to half a step (asymmetric); with a zero gradient there a
        channel's largest weight would stop training."""
        return self.fake_quant(kernel, min_val, max_val, clip_gradient=False)

    def _on_export_grid(self, quantized, scale):
        """Quantized weights as the TFLite converter must see them.

        The converter stores fake-quantized weights of 4 bits as INT4 and of
        8 bits as int8, and re-grids other widths (3-bit levels came out as
        other int8 levels). A symmetric k-bit grid is a subset of the 4- or
        8-bit grid of the same scale, so k-bit weights are traced as a 4-bit
        (k < 4, when INT4 is wanted) or 8-bit fake quant whose range gives
        that scale: the stored levels are the trained ones, exactly.
        """
        bits = self.num_bits
        carrier = 4 if bits <= 4 and packs_int4() else 8
        if bits in (carrier, 8) or bits > 8 or not (self.symmetric and self.narrow_range):
            return quantized
        bound = (2 ** (carrier - 1) - 1) * scale
        return quantizers.fake_quant(
            quantized,
            -bound,
            bound,
            num_bits=carrier,
            symmetric=True,
            narrow_range=True,
            axis=-1 if self.per_channel else None,
        )
