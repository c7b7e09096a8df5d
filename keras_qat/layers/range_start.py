"""Where a learned step starts (`keras_qat.layers.learned_range`).

A learned step starts from the data's own range (a kernel's, the first
training batch's min / max) scaled by the one of `START_FRACTIONS` whose
grid rounds that data with the least squared error: at 4 bits the full
range's grid rounds most values coarsely, and in a short fine-tune Adam
moves a log-step by only a few percent (docs/measurements.md).
"""

import tensorflow as tf

from keras_qat.layers.quantizer import one_replica

START_FRACTIONS = tuple(0.3 + 0.05 * i for i in range(15))


def candidate_errors(squared_error):
    """`squared_error(fraction)` (a scalar, or one per channel) for each of
    `START_FRACTIONS`, one candidate at a time."""
    fractions = tf.constant(START_FRACTIONS, tf.float32)
    return tf.map_fn(squared_error, fractions, parallel_iterations=1)


def least_error_fraction(errors):
    """The one of `START_FRACTIONS` whose error (from `candidate_errors`) is
    least."""
    return tf.gather(tf.constant(START_FRACTIONS, tf.float32), tf.argmin(errors, axis=0))


def start_weight_fraction(kernel, own_step, lowest, highest, per_channel):
    """The fraction of `own_step` (the step of the kernel's own range, per
    channel or not) whose grid of levels `[lowest, highest]` rounds `kernel`
    with the least squared error."""
    axes = list(range(kernel.shape.rank - 1)) if per_channel else None

    def squared_error(fraction):
        step = own_step * fraction
        rounded = tf.clip_by_value(tf.round(kernel / step), lowest, highest) * step
        return tf.reduce_sum(tf.square(rounded - kernel), axis=axes)

    return least_error_fraction(candidate_errors(squared_error))


def activation_errors(x, low, high, num_bits, narrow_range):
    """The squared error of rounding `x` on the grid over `[f * low, f *
    high]`, for each fraction `f` of `START_FRACTIONS`."""

    def squared_error(fraction):
        rounded = tf.quantization.fake_quant_with_min_max_vars(
            x, fraction * low, fraction * high, num_bits=num_bits, narrow_range=narrow_range
        )
        return tf.reduce_sum(tf.square(rounded - x))

    return candidate_errors(squared_error)


def sum_across_replicas(value):
    """`value` summed over the replicas of a `tf.distribute` strategy."""
    if one_replica():
        return value
    return tf.distribute.get_replica_context().all_reduce("sum", value)
