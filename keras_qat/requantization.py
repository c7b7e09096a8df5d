"""Requantization: an int8 tensor moved onto another int8 grid.

Where a tensor on one grid is read by an op that needs another (a
concatenation whose operands share one scale), TFLite's converter inserts
an int8-to-int8 QUANTIZE. XNNPACK, TFLite's default CPU delegate, computes it
with the ratio of the two scales rounded to 8 fractional bits: with
`M = lrintf(256 * input_scale / output_scale)`,
`q_out = floor((M * (q_in - zp_in) + 128) / 256) + zp_out` (its qs8 convert
kernels, for ratios from 2**-8 to 2**7; TFLite's built-in kernel, used
outside that span, rounds nearly as a float would). A float rounding of
the same values is 3-27 % of values a step apart from that (measured), so
the Keras model computes it as XNNPACK does.
"""

import tensorflow as tf

# The ratios of scales XNNPACK's int8 convert kernels take.
XNNPACK_RATIOS = (2.0**-8, 2.0**7)


def requantized(x, input_scale, output_scale):
    """`x`, which lies on a grid of step `input_scale`, on the grid of step
    `output_scale` as XNNPACK's int8 QUANTIZE rounds it (not clamped: the
    output grid's `FakeQuant` clamps), with a straight-through gradient.

    Outside XNNPACK's span of ratios, or where either scale is 0 (a grid
    not quantizing yet), `x` is returned as it is, for the output grid's
    `FakeQuant` to round.

    Args:
        x: A float tensor on the input grid.
        input_scale: The input grid's step (a scalar tensor).
        output_scale: The output grid's step (a scalar tensor).

    Example:

    >>> step = 0.0175  # a value 180 steps of 0.0175 * 3.385 / 180 up, at 3.385 steps
    >>> round(float(requantized(3.385 * step, step * 3.385 / 180, step) / step), 3)
    4.0
    """
    x = tf.convert_to_tensor(x)
    input_scale = tf.cast(input_scale, tf.float32)
    output_scale = tf.cast(output_scale, tf.float32)
    ratio = input_scale / tf.where(output_scale > 0.0, output_scale, 1.0)
    multiplier = tf.round(256.0 * ratio)  # lrintf: to nearest, ties to even
    levels = tf.round(tf.cast(x, tf.float32) / tf.where(input_scale > 0.0, input_scale, 1.0))
    moved = tf.floor((multiplier * levels + 128.0) / 256.0) * output_scale
    low, high = XNNPACK_RATIOS
    applies = (input_scale > 0.0) & (output_scale > 0.0) & (ratio >= low) & (ratio <= high)
    exact = tf.where(applies, tf.cast(moved, x.dtype), x)
    return x + tf.stop_gradient(exact - x)
