"""LSQ's fake quant: the forward and backward pass of a learned step.

Esser et al. 2019 ("Learned Step Size Quantization") learn the step `s` of
the grid by gradient descent. With `v = x / s` and the grid's integer
bounds `qn < 0 < qp` (levels below and above the one of zero):

    y = round(clip(v, qn, qp)) * s
    dy/dx = 1 inside [qn, qp], else 0                 (straight through)
    dy/ds = round(v) - v inside, qn below, qp above   (LSQ's eq. 3)

and the step's gradient is scaled by `g = 1 / sqrt(numel * qp)` (numel:
the elements quantized with that step), so that it learns at the pace of
the weights. The forward pass is TensorFlow's fake-quant op on the range
`[(qmin - z) * s, (qmax - z) * s]` (`z`: the level of zero), whose grid is
exactly step `s`: what the converter exports is the learned step.

The layers that learn steps with it: `keras_qat.layers.learned_range`.
"""

import tensorflow as tf

from keras_qat import quantizers

MIN_STEP = 1e-8
MAX_STEP = 1e8


def at_least_min_step(step):
    """`step`, at least `MIN_STEP`."""
    return tf.maximum(step, MIN_STEP)


def zero_level(num_bits, narrow_range, symmetric):
    """The level of zero on a symmetric grid (the middle one), else None."""
    qmin, qmax = quantizers.quant_levels(num_bits, narrow_range)
    return qmin + (qmax - qmin + 1) // 2 if symmetric else None


def learned_step_fake_quant(x, step, zero_point, num_bits=8, narrow_range=False, grad_scale=1.0):
    """Fake-quantizes `x` on the grid of step `step` whose level `zero_point`
    is 0, with LSQ's gradients (see the module docstring).

    Args:
        x: A float tensor.
        step: The step, a scalar or one per channel of `x`'s last axis.
        zero_point: The level of 0 (an integer value, scalar).
        num_bits, narrow_range: The grid's levels, as in `fake_quant`.
        grad_scale: The factor of the step's gradient.

    Returns:
        A tensor like `x`.
    """
    qmin, qmax = quantizers.quant_levels(num_bits, narrow_range)
    zero_point = tf.cast(zero_point, tf.float32)
    lowest, highest = qmin - zero_point, qmax - zero_point  # qn, qp
    per_channel = step.shape.rank == 1
    dtype = x.dtype

    @tf.custom_gradient
    def quantize(x, step):
        s = at_least_min_step(step)
        y = quantizers.fake_quant(
            x,
            lowest * s,
            highest * s,
            num_bits=num_bits,
            narrow_range=narrow_range,
            axis=-1 if per_channel else None,
        )

        def grad(dy):
            # TensorFlow's fused fake-quant gradient gives dx (dy inside the
            # range, 0 outside) and the sums of dy below and above it. LSQ's
            # step term is round(v) - v = (y - x) / s inside, qn below and qp
            # above: one product and one reduction beyond the fused op.
            dx, below, above = _fake_quant_gradients(
                dy, x, lowest * s, highest * s, num_bits, narrow_range
            )
            axes = list(range(x.shape.rank - 1)) if per_channel else None
            inside = tf.reduce_sum(dx * (y - x), axis=axes) / s
            d_step = (inside + lowest * below + highest * above) * grad_scale
            return dx, d_step

        return y, grad

    # A tensor, not the variable: its read is what the gradient reaches.
    step = tf.convert_to_tensor(step, tf.float32)
    return tf.cast(quantize(tf.cast(x, tf.float32), step), dtype)


def _fake_quant_gradients(dy, x, low, high, num_bits, narrow_range):
    """TensorFlow's fused fake-quant gradient over the nudged range of `[low,
    high]` (per channel of the last axis when `low` is a vector): `dy` where
    `x` is inside it (bounds included), else 0; the sum of `dy` below it;
    the sum above it."""
    if low.shape.rank == 1:
        op = tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient
    else:
        op = tf.quantization.fake_quant_with_min_max_vars_gradient
    return op(dy, x, low, high, num_bits=num_bits, narrow_range=narrow_range)


def grad_scale(elements, highest, per_replica=False):
    """LSQ's `1 / sqrt(numel * qp)`; with `per_replica`, `elements` counts
    one replica's share of the global batch."""
    elements = tf.cast(elements, tf.float32)
    context = tf.distribute.get_replica_context()
    if per_replica and context is not None:
        elements *= context.num_replicas_in_sync
    return tf.math.rsqrt(elements * tf.maximum(highest, 1.0))


def _step_of(log_step, rate):
    """`exp(rate * log_step)`, whose backward pass divides the step's
    gradient by the step (see the module docstring)."""

    @tf.custom_gradient
    def step_of_variable(log_step):
        step = tf.exp(rate * log_step)

        def grad(d_step):
            return d_step / step

        return step, grad

    return step_of_variable(log_step)


def step_of(log_step_variable, rate=1.0):
    """The step of a `log_scale` variable that holds `log(step) / rate`."""
    return _step_of(tf.convert_to_tensor(log_step_variable, tf.float32), float(rate))


def relative_step_of(log_factor, rate, own_step):
    """`exp(rate * log_factor) * own_step` within `[MIN_STEP, MAX_STEP]`,
    whose backward pass divides the step's gradient by the step, as
    `step_of`'s (`own_step`: a statistic of the kernel, not differentiated)."""
    own_step = tf.stop_gradient(tf.convert_to_tensor(own_step, tf.float32))

    @tf.custom_gradient
    def step_of_variable(log_factor):
        step = tf.clip_by_value(tf.exp(rate * log_factor) * own_step, MIN_STEP, MAX_STEP)

        def grad(d_step):
            return d_step / step

        return step, grad

    return step_of_variable(tf.convert_to_tensor(log_factor, tf.float32))
