"""Requantization: an int8 tensor (or a product of two) moved onto another
int8 grid, as TFLite's default CPU kernels (XNNPACK) round it.

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

An int8 MUL is another requantization: XNNPACK multiplies the two operands'
levels exactly, as integers, then scales the product by the float32
`(scale_a * scale_b) / output_scale` and rounds to nearest, ties to even. A
float product of the dequantized values rounds the same way except within
float error of a tie (measured: 0.006-0.015 % of a random MUL's outputs),
but a tie can recur on many values (a swish of one level pair: 1.2 % of an
EfficientNet stem's outputs), so the Keras model computes it as XNNPACK
does too (`multiplied`).

A float model input becomes int8 by a QUANTIZE from float. XNNPACK multiplies
the input by the float32 reciprocal of the scale and rounds to nearest, ties
to even (measured: every one of 65,536 values placed within a few float32
steps of a tie, as `round(x * float32(1 / scale))`); TensorFlow's fake-quant
kernel, which subtracts the range's minimum first, rounds 23 % of those
values the other way. Random float inputs meet such near-ties a few times in
a batch (1 in 100,000 values), and a network's layer norms can amplify one
step at its input to many at its output, so the Keras model rounds a float
input as XNNPACK does (`from_float`).
"""

import tensorflow as tf

# The ratios of scales XNNPACK's int8 convert kernels take.
XNNPACK_RATIOS = (2.0**-8, 2.0**7)
# The ratios of a product's scale to the output's that its int8 MUL takes.
XNNPACK_PRODUCT_RATIOS = (2.0**-16, 2.0**8)


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


def multiplied(product, operand_scales, output_scale):
    """`product`, a product of two tensors on grids of steps
    `operand_scales`, on the grid of step `output_scale` as XNNPACK's int8
    MUL rounds it (not clamped: the output grid's `FakeQuant` clamps), with
    a straight-through gradient.

    Outside XNNPACK's span of ratios, or where a scale is 0 (a grid not
    quantizing yet), `product` is returned as it is.

    Args:
        product: A float tensor, the product of the two grids' values.
        operand_scales: The two operands' steps (scalar tensors).
        output_scale: The output grid's step (a scalar tensor).

    Example:

    >>> scale_a, scale_b, step = 0.04337457, 1 / 256, 0.12838098
    >>> product = (12 * scale_a) * (221 * scale_b)  # a float rounds 3.5 steps to 4
    >>> round(float(multiplied(product, (scale_a, scale_b), step) / step), 3)
    3.0
    """
    product = tf.convert_to_tensor(product)
    scale_a, scale_b = (tf.cast(s, tf.float32) for s in operand_scales)
    output_scale = tf.cast(output_scale, tf.float32)
    product_scale = scale_a * scale_b
    ratio = product_scale / tf.where(output_scale > 0.0, output_scale, 1.0)
    levels = tf.round(
        tf.cast(product, tf.float32) / tf.where(product_scale > 0.0, product_scale, 1.0)
    )
    moved = tf.round(levels * ratio) * output_scale  # tf.round: ties to even
    low, high = XNNPACK_PRODUCT_RATIOS
    applies = (product_scale > 0.0) & (output_scale > 0.0) & (ratio >= low) & (ratio < high)
    exact = tf.where(applies, tf.cast(moved, product.dtype), product)
    return product + tf.stop_gradient(exact - product)


def from_float(x, scale):
    """`x`, a float tensor, on the grid of step `scale` as XNNPACK's int8
    QUANTIZE of a float tensor rounds it: `round(x * (1 / scale))`, the
    reciprocal and the product in float32, to nearest, ties to even (not
    clamped: the grid's `FakeQuant` clamps), with a straight-through
    gradient. Where `scale` is 0 (a grid not quantizing yet) and where `x`
    is not finite, `x` as it is.

    Args:
        x: A float tensor.
        scale: The grid's step (a scalar tensor).

    Example:

    >>> float(from_float(0.625, 0.25) / 0.25)  # 2.5 steps: to even (TF's kernel: 3)
    2.0
    """
    x = tf.convert_to_tensor(x)
    scale = tf.cast(scale, tf.float32)
    reciprocal = 1.0 / tf.where(scale > 0.0, scale, 1.0)
    exact = tf.round(tf.cast(x, tf.float32) * reciprocal) * scale
    applies = (scale > 0.0) & tf.math.is_finite(x)  # +-inf: left for the FakeQuant to clamp
    exact = tf.where(applies, tf.cast(exact, x.dtype), x)
    return tf.where(applies, x + tf.stop_gradient(exact - x), x)
