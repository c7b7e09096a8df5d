"""The scale the TFLite converter stores for a range.

The converter computes `(max - min) / levels` in float64 and stores it
rounded to float32. TFLite's kernels that round from the scales (XNNPACK's
MUL and QUANTIZE) use that value, so the Keras model must too, to a unit in
the last place; a float32 division is not that value (`converter_scale`).
The Keras model computes it in float64 too, except on TPUs, which have no
float64: there it is computed exactly in float32 arithmetic (about six
times as many operations).
"""

import tensorflow as tf


def converter_scale(low, high, levels):
    """`(high - low) / levels` rounded once to float32: the scale the TFLite
    converter stores for a range (it computes in float64; measured: 102 of
    102 ranges).

    A plain float32 division differs from it by a unit in the last place
    for 28 of 102 trained ranges, and in a `tf.function` (where TensorFlow
    turns the division by a constant into a product with its reciprocal)
    for 67 of 102 (measured). Kernels that round from the scales (XNNPACK's
    MUL and QUANTIZE) then round some near-ties the other way. Under a
    `TPUStrategy` the result is computed in float32 (`float32_scale`).

    Args:
        low, high: float32 tensors, `low <= 0 <= high`.
        levels: The number of steps of the grid, `qmax - qmin`.

    Returns:
        A float32 tensor of the shape of `low`.
    """
    if _on_tpu():
        return float32_scale(low, high, levels)
    span = tf.cast(high, tf.float64) - tf.cast(low, tf.float64)
    return tf.cast(span / levels, tf.float32)


def _on_tpu():
    """Whether the model runs on TPUs (under a `TPUStrategy`, as Keras
    models on TPUs do), where XLA has no float64."""
    # TPUStrategy, TPUStrategyV1 and TPUStrategyV2, by name: not every
    # TensorFlow release exports every one of them.
    return type(tf.distribute.get_strategy()).__name__.startswith("TPUStrategy")


def float32_scale(low, high, levels):
    """`converter_scale` in float32 arithmetic that no graph rewrite
    changes: the span and the quotient's remainder are computed exactly
    (Knuth's two-sum, Dekker's two-product). Exact ties of the float64
    result (2 in 100,000 random ranges) may round the other way, as may a
    few more under XLA, which contracts some of the operations."""
    span, span_error = _two_sum(high, -low)
    reciprocal = 1.0 / levels
    quotient = span * reciprocal
    product, product_error = _two_product(quotient, tf.fill(tf.shape(quotient), levels))
    remainder = ((span - product) - product_error) + span_error
    return quotient + remainder * reciprocal


def _two_sum(a, b):
    """`(s, e)`: `s` is `a + b` in float32 and `s + e = a + b` exactly."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def _split(a):
    """`(high, low)`, `a = high + low` exactly, each with at most 12
    significant bits (Veltkamp's split for float32)."""
    scaled = 4097.0 * a
    high = scaled - (scaled - a)
    return high, a - high


def _two_product(a, b):
    """`(p, e)`: `p` is `a * b` in float32 and `p + e = a * b` exactly."""
    product = a * b
    a_high, a_low = _split(a)
    b_high, b_low = _split(b)
    error = ((a_high * b_high - product) + a_high * b_low + a_low * b_high) + a_low * b_low
    return product, error
