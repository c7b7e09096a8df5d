"""TFLite's int8 RSQRT, computed as its kernel computes it.

An int8 model's layer normalization has an RSQRT (`keras_qat.layers.
layer_norm`). TFLite runs it with its built-in kernel (XNNPACK does not
take it), in fixed point: for an input level `v` (the input minus its zero
point), `2**20 / sqrt(v)` rounded to an integer (from a Newton-Raphson
inverse square root in 32-bit fixed point), then that integer times
`1 / (sqrt(input_scale) * output_scale)` as a 31-bit multiplier, rounded
twice (a doubling high multiplication, then a rounding shift). The exact
value rounds the same way except near a tie: a level that the float
computation puts at 42.49999921 steps, the kernel puts at 42.50008 and
rounds to 43. One such input level recurs in every row whose variance has
it (1.6 % of a small ViT's rows), and a layer norm amplifies one step of its
inverse standard deviation into several output steps, so the Keras model
computes it as the kernel does (`rounded_rsqrt`).

The integer part, `2**20 / sqrt(v)` for the 256 levels an int8 input can
take, does not depend on the scales: `INVERSE_SQRT_TABLE`, computed here
with Python integers as the kernel computes it (TensorFlow's
`GetInvSqrtQuantizedMultiplierExp` and `MultiplyByQuantizedMultiplier`,
gemmlowp's fixed-point operations). The scale-dependent multiplication runs
in the model, in int64.
"""

import numpy as np
import tensorflow as tf

from keras_qat import stored_scale

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# The kernel scales the inverse square root by 2**20 to keep it an integer.
TABLE_SHIFT = 20


def _doubling_high_mul(a, b):
    """gemmlowp's SaturatingRoundingDoublingHighMul of two int32 values."""
    if a == b == INT32_MIN:
        return INT32_MAX
    product = a * b
    nudge = 2**30 if product >= 0 else 1 - 2**30
    total = product + nudge
    quotient = abs(total) // 2**31  # C++ division truncates toward zero
    return quotient if total >= 0 else -quotient


def _rounding_shift_right(x, exponent):
    """gemmlowp's RoundingDivideByPOT: `x / 2**exponent`, ties away from 0."""
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


def _times_power_of_two(x, exponent):
    """gemmlowp's SaturatingRoundingMultiplyByPOT for int32 `x`."""
    if exponent <= 0:
        return _rounding_shift_right(x, -exponent)
    return min(max(x * 2**exponent, INT32_MIN), INT32_MAX)


def _fixed_point_inverse_sqrt(value):
    """`(multiplier, left_shift)` of `1 / sqrt(value)` as TensorFlow's
    GetInvSqrtQuantizedMultiplierExp returns them (`reverse_shift=-1`)."""
    if value <= 1:
        return INT32_MAX, 0
    shift = 11
    headroom = 32 - value.bit_length() - 1  # leading zeros of a uint32, less one
    pairs = headroom // 2 - 1
    shift -= pairs
    value <<= 2 * pairs
    # Q3.28 fixed point: x * y keeps the sum of the operands' integer bits.
    half_input = _times_power_of_two(value >> 1, -1)
    half_three = (1 << 28) + (1 << 27)
    x = 1 << 28
    for _ in range(5):  # Newton-Raphson from 1
        cube = _times_power_of_two(_doubling_high_mul(_doubling_high_mul(x, x), x), 6)
        x = _times_power_of_two(
            _doubling_high_mul(half_three, x) - _doubling_high_mul(half_input, cube), 3
        )
    x = _doubling_high_mul(x, 1518500250)  # sqrt(2) / 2 in Q0.31
    if shift < 0:
        x <<= -shift
        shift = 0
    return x, -shift


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """TensorFlow Lite's MultiplyByQuantizedMultiplier (double rounding)."""
    left, right = max(shift, 0), max(-shift, 0)
    return _rounding_shift_right(_doubling_high_mul(x * 2**left, multiplier), right)


def _table():
    values = []
    for level in range(256):
        multiplier, shift = _fixed_point_inverse_sqrt(level)
        values.append(multiply_by_quantized_multiplier(1, multiplier, shift + TABLE_SHIFT))
    return np.array(values, dtype=np.int64)


# `round(2**20 / sqrt(v))` as the kernel computes it, for v = 0 ... 255.
INVERSE_SQRT_TABLE = _table()


def quantized_multiplier(real):
    """`(multiplier, shift)` of a positive float64 tensor `real` as
    TensorFlow Lite's QuantizeMultiplier gives them: `real = multiplier *
    2**(shift - 31)`, the multiplier in `[2**30, 2**31)` rounded half away
    from zero (int64 tensors)."""
    real = tf.cast(real, tf.float64)
    two = tf.constant(2.0, tf.float64)
    shift = tf.floor(tf.math.log(real) / tf.math.log(two)) + 1.0
    fraction = real / tf.pow(two, shift)  # in [0.5, 1) but for log's rounding
    shift += tf.cast(fraction >= 1.0, tf.float64) - tf.cast(fraction < 0.5, tf.float64)
    multiplier = tf.floor(real / tf.pow(two, shift) * 2.0**31 + 0.5)
    carry = multiplier >= 2.0**31
    multiplier = tf.where(carry, multiplier / 2.0, multiplier)
    shift = tf.where(carry, shift + 1.0, shift)
    return tf.cast(multiplier, tf.int64), tf.cast(shift, tf.int64)


def _rsqrt_levels(levels, input_scale, output_scale):
    """The kernel's output levels (before the zero point and the clamp)
    for input levels `levels` (int64, 1 ... 255)."""
    root = tf.sqrt(input_scale) * output_scale  # float32, as the kernel's
    multiplier, shift = quantized_multiplier(1.0 / tf.cast(root, tf.float64))
    shift = shift - TABLE_SHIFT
    data = tf.gather(tf.constant(INVERSE_SQRT_TABLE), levels)
    data = data * tf.bitwise.left_shift(tf.ones_like(shift), tf.maximum(shift, 0))
    high = tf.bitwise.right_shift(data * multiplier + 2**30, 31)  # both positive
    right = tf.maximum(-shift, 0)
    mask = tf.bitwise.left_shift(tf.ones_like(right), right) - 1
    above_half = tf.cast(
        tf.bitwise.bitwise_and(high, mask) > tf.bitwise.right_shift(mask, 1), tf.int64
    )
    return tf.bitwise.right_shift(high, right) + above_half


def rounded_rsqrt(inverse_root, values, input_scale, output_scale):
    """`inverse_root` (`rsqrt(values)`, `values` on the grid of step
    `input_scale`) on the grid of step `output_scale` as TFLite's int8
    RSQRT rounds it (not clamped: the output grid's `FakeQuant` clamps),
    with a straight-through gradient.

    Where either scale is 0 (a grid not quantizing yet), where `values` is
    0 (the kernel's largest output, which `inverse_root`, infinite, is
    clamped to) or beyond 255 levels, and on TPUs (no float64 there),
    `inverse_root` as it is.

    Example:

    >>> import numpy as np
    >>> v_scale, scale = np.float32(0.006619133520871401), np.float32(0.04820135608315468)
    >>> values = 36 * v_scale
    >>> round(float(1 / np.sqrt(np.float64(values)) / scale), 6)  # just below the tie
    42.499999
    >>> x = rounded_rsqrt(tf.math.rsqrt(values), values, v_scale, scale)
    >>> round(float(x / scale), 3)
    43.0
    """
    inverse_root = tf.convert_to_tensor(inverse_root)
    input_scale = tf.cast(input_scale, tf.float32)
    output_scale = tf.cast(output_scale, tf.float32)
    if stored_scale._on_tpu():
        return inverse_root
    valid = (input_scale > 0.0) & (output_scale > 0.0)
    levels = tf.round(tf.cast(values, tf.float32) / tf.where(valid, input_scale, 1.0))
    in_table = valid & (levels >= 1.0) & (levels <= 255.0)
    levels = tf.cast(tf.where(in_table, levels, 1.0), tf.int64)
    outputs = _rsqrt_levels(
        levels, tf.where(valid, input_scale, 1.0), tf.where(valid, output_scale, 1.0)
    )
    exact = tf.cast(outputs, tf.float32) * output_scale
    # Where the table does not apply, `inverse_root` itself (an infinite one
    # would make the straight-through sum NaN).
    exact = tf.where(in_table, tf.cast(exact, inverse_root.dtype), inverse_root)
    straight_through = inverse_root + tf.stop_gradient(exact - inverse_root)
    return tf.where(in_table, straight_through, inverse_root)
