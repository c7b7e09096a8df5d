"""FakeQuant: the layer that owns the range of one quantized activation."""

import contextlib
import threading

import keras
import tensorflow as tf

from keras_qat import ops
from keras_qat.config import check_non_negative_int

_export_state = threading.local()


@contextlib.contextmanager
def tracing_for_export():
    """Within this context, quantizers quantize unconditionally in inference.

    A trained quantization network checks at run time whether its quant delay
    has passed (a `tf.cond`). The TFLite converter cannot quantize through
    control flow, so `export_tflite` traces the model inside this context,
    after checking that every delay has passed and every range is calibrated.
    """
    previous = getattr(_export_state, "active", False)
    _export_state.active = True
    try:
        yield
    finally:
        _export_state.active = previous


def is_tracing_for_export():
    """Whether the model is being traced by `export_tflite`."""
    return getattr(_export_state, "active", False)


def batch_range(x, reduce_axes=None):
    """Returns `(min, max)` of the finite values of `x`, always containing 0.

    Non-finite values (NaN, +-inf) are treated as 0, so they never reach a
    range; 0 is inside every range anyway. Masking every element costs two
    extra passes over each activation in every training step, so the plain
    min / max is taken first and the masked one only when that is not finite.

    Args:
        x: Tensor; reduced in float32.
        reduce_axes: Axes to reduce, `None` for all (a per-tensor range).

    Returns:
        Two float32 tensors.
    """
    x = tf.cast(x, tf.float32)

    def reduce(values):
        return (
            tf.reduce_min(values, axis=reduce_axes),
            tf.reduce_max(values, axis=reduce_axes),
        )

    batch_min, batch_max = reduce(x)
    finite = tf.logical_and(
        tf.reduce_all(tf.math.is_finite(batch_min)),
        tf.reduce_all(tf.math.is_finite(batch_max)),
    )
    batch_min, batch_max = tf.cond(
        finite,
        lambda: (batch_min, batch_max),
        lambda: reduce(tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))),
    )
    return tf.minimum(batch_min, 0.0), tf.maximum(batch_max, 0.0)


def across_replicas(batch_min, batch_max):
    """The min of `batch_min` and max of `batch_max` over all replicas.

    Inside a `tf.distribute` strategy each replica sees its shard of the
    global batch; gathering the per-replica values and reducing them gives
    every replica the range that a single device computes from the whole
    batch. (`tf.distribute.ReduceOp` has no MIN / MAX, hence `all_gather`.)
    Outside a strategy, or with one replica, the values are returned as
    they are.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return batch_min, batch_max
    mins = context.all_gather(batch_min[None], axis=0)
    maxs = context.all_gather(batch_max[None], axis=0)
    return tf.reduce_min(mins, axis=0), tf.reduce_max(maxs, axis=0)


@keras.saving.register_keras_serializable(package="keras_qat")
class FakeQuant(keras.layers.Layer):
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
        fixed_range: `None` to learn the range, or a `(min, max)` pair with
            `min <= 0 <= max` that is used as it is.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        Any shape; with `per_channel=True`, the size along `axis` must be
        known.

    Output shape:
        Same as the input.

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
        num_bits=8,
        symmetric=False,
        narrow_range=False,
        per_channel=False,
        axis=-1,
        ema=True,
        ema_decay=0.999,
        quant_delay=0,
        fixed_range=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        ops.check_num_bits(num_bits)
        if fixed_range is not None:
            if (
                not isinstance(fixed_range, (list, tuple))
                or len(fixed_range) != 2
                or not fixed_range[0] <= 0 <= fixed_range[1]
                or fixed_range[0] == fixed_range[1]
            ):
                raise ValueError(
                    "Received an invalid value for `fixed_range`, expected "
                    "None or a pair (min, max) with min <= 0 <= max and "
                    f"min < max. Received: fixed_range={fixed_range!r}"
                )
            fixed_range = (float(fixed_range[0]), float(fixed_range[1]))
            if per_channel:
                raise ValueError("`fixed_range` is per tensor; it cannot be used with per_channel=True.")
        for name, value in (
            ("symmetric", symmetric),
            ("narrow_range", narrow_range),
            ("per_channel", per_channel),
            ("ema", ema),
        ):
            if not isinstance(value, bool):
                raise ValueError(
                    f"Received an invalid value for `{name}`, expected a "
                    f"boolean. Received: {name}={value!r}"
                )
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(
                "Received an invalid value for `axis`, expected an integer. "
                f"Received: axis={axis!r}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                "Received an invalid value for `ema_decay`, expected a "
                f"number in [0, 1). Received: ema_decay={ema_decay!r}"
            )
        check_non_negative_int("quant_delay", quant_delay)
        self.num_bits = num_bits
        self.symmetric = symmetric
        self.narrow_range = narrow_range
        self.per_channel = per_channel
        self.axis = axis
        self.ema = ema
        self.ema_decay = float(ema_decay)
        self.quant_delay = quant_delay
        self.fixed_range = fixed_range
        self.supports_masking = True

    def build(self, input_shape):
        shape = ()
        if self.per_channel:
            rank = len(input_shape)
            if not -rank <= self.axis < rank or input_shape[self.axis] is None:
                raise ValueError(
                    f"`FakeQuant(per_channel=True, axis={self.axis})` needs "
                    "an input whose size along `axis` is known. "
                    f"Received: input_shape={input_shape}"
                )
            shape = (input_shape[self.axis],)
            self._reduce_axes = [
                d for d in range(rank) if d != self.axis % rank
            ]
        else:
            self._reduce_axes = None
        common = dict(
            shape=shape,
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
        )
        low, high = self.fixed_range or (0.0, 0.0)
        self.min = self.add_weight(
            name="min", initializer=keras.initializers.Constant(low), **common
        )
        self.max = self.add_weight(
            name="max", initializer=keras.initializers.Constant(high), **common
        )
        self.step = self.add_weight(
            name="step",
            shape=(),
            initializer="zeros",
            dtype="int64",
            trainable=False,
            aggregation="only_first_replica",
        )

    def _quantize(self, x, min_val, max_val):
        return ops.fake_quant(
            x,
            min_val,
            max_val,
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            axis=self.axis if self.per_channel else None,
        )

    def update_range(self, x):
        """Updates the range from batch `x`; returns the new `(min, max)`."""
        if self.fixed_range is not None:
            return self.min, self.max
        batch_min, batch_max = across_replicas(
            *batch_range(x, self._reduce_axes)
        )
        decay = self.ema_decay if self.ema else 0.0
        first = tf.equal(self.step, 0)
        new_min = tf.where(
            first, batch_min, decay * self.min + (1.0 - decay) * batch_min
        )
        new_max = tf.where(
            first, batch_max, decay * self.max + (1.0 - decay) * batch_max
        )
        self.min.assign(new_min)
        self.max.assign(new_max)
        return new_min, new_max

    def observe(self, inputs, training=False):
        """Returns `(min, max, active)` for quantizing this call's inputs.

        A training call first updates the range from `inputs` and advances
        the step counter. `active` is a boolean tensor (quantize, or pass
        through during the quant delay), or Python `True` while the model is
        traced for export.
        """
        if training:
            step = tf.identity(self.step)
            min_val, max_val = self.update_range(inputs)
            self.step.assign_add(1)
            return min_val, max_val, step >= self.quant_delay
        return self.min, self.max, self._active_in_inference()

    def _active_in_inference(self):
        if is_tracing_for_export():
            return True
        active = self.step >= self.quant_delay
        if self.fixed_range is None:  # a learned range needs a batch first
            active = tf.logical_and(active, self.step > 0)
        return active

    def output_grid(self, training=False):
        """Returns `(scale, active)` of this layer's output grid, or None.

        `scale` is the step of the current range's grid (the scale of the
        tensor in an integer model); `active` whether the latest call
        quantized its output: a boolean tensor, or Python `True` while the
        model is traced for export. Read after this layer's call in the same
        step (as a consumer does), a training call has already advanced the
        step counter. `None` for a per-channel range, which no integer
        kernel takes as input.

        Args:
            training: Whether the latest call was a training call.
        """
        if self.per_channel:
            return None
        scale = ops.grid_scale(
            self.min, self.max, self.num_bits, self.symmetric, self.narrow_range
        )
        if training and not is_tracing_for_export():
            return scale, self.step > self.quant_delay
        return scale, self._active_in_inference()

    def quantize_with(self, x, min_val, max_val, active):
        """Fake-quantizes `x` with the range from `observe` when `active`."""
        if active is True:
            return self._quantize(x, min_val, max_val)
        return tf.cond(
            active,
            lambda: self._quantize(x, min_val, max_val),
            lambda: tf.identity(x),
        )

    def call(self, inputs, training=False):
        return self.quantize_with(inputs, *self.observe(inputs, training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            num_bits=self.num_bits,
            symmetric=self.symmetric,
            narrow_range=self.narrow_range,
            per_channel=self.per_channel,
            axis=self.axis,
            ema=self.ema,
            ema_decay=self.ema_decay,
            quant_delay=self.quant_delay,
            fixed_range=self.fixed_range,
        )
        return config
