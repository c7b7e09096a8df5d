"""Fake quantization: quantize-dequantize with straight-through gradients.

Everything here is TensorFlow's `FakeQuantWithMinMaxVars` arithmetic
("nudging"), wrapped so that it can be used with any range, any channel axis
and any floating dtype:

- `qmin = 1 if narrow_range else 0`, `qmax = 2**num_bits - 1`.
- The range is first made to contain zero (`min <= 0 <= max`), and widened to
  `[-M, M]`, `M = max(|min|, |max|)`, when `symmetric=True`.
- `scale = (max - min) / (qmax - qmin)`,
  `zero_point = clamp(round(qmin - min / scale), qmin, qmax)`,
  `nudged_min = (qmin - zero_point) * scale`,
  `nudged_max = (qmax - zero_point) * scale`.
- `out = floor((clamp(x, nudged_min, nudged_max) - nudged_min) / scale + 0.5)
  * scale + nudged_min`, all in float32.

The gradient is the straight-through estimator with clipping: `dx = dy` where
`nudged_min <= x <= nudged_max` and 0 elsewhere; `dmin` / `dmax` collect the
gradient of the elements below / above the range.
"""

import numpy as np
import tensorflow as tf

from keras_qat import stored_scale
from keras_qat.config import check_num_bits


def quant_levels(num_bits, narrow_range=False):
    """Returns the integer grid `(qmin, qmax)` of a fake-quant op.

    `qmin = 1 if narrow_range else 0` and `qmax = 2**num_bits - 1`, the grid
    of TensorFlow's `FakeQuantWithMinMaxVars`.

    Args:
        num_bits: Integer in `[2, 16]`.
        narrow_range: Whether the lowest level is left out.

    Returns:
        A tuple of two Python integers `(qmin, qmax)`.

    Raises:
        ValueError: if `num_bits` is not an integer in `[2, 16]`.
    """
    check_num_bits(num_bits)
    return (1 if narrow_range else 0), 2**num_bits - 1


def quant_range(min_val, max_val, symmetric=False):
    """Returns the range that fake quantization actually uses.

    The range is made to contain zero (`min <= 0 <= max`): a range that does
    not would otherwise slide to `[0, max - min]` inside the TensorFlow op.
    With `symmetric=True` it is widened to `[-M, M]`,
    `M = max(|min|, |max|)`.

    Args:
        min_val: float32 tensor, scalar or per channel.
        max_val: float32 tensor of the same shape.
        symmetric: Whether to make the range symmetric around zero.

    Returns:
        A tuple `(min, max)` of float32 tensors.
    """
    min_val = tf.minimum(min_val, 0.0)
    max_val = tf.maximum(max_val, 0.0)
    if symmetric:
        bound = tf.maximum(-min_val, max_val)
        return -bound, bound
    return min_val, max_val


def nudged_range(min_val, max_val, num_bits=8, narrow_range=False):
    """Returns `(nudged_min, nudged_max, scale)` of TensorFlow's fake quant.

    The nudged range is the one whose grid represents zero exactly:
    `scale = (max - min) / (qmax - qmin)`,
    `zero_point = clamp(round(qmin - min / scale), qmin, qmax)`,
    `nudged_min = (qmin - zero_point) * scale`,
    `nudged_max = (qmax - zero_point) * scale`. Rounding is half away from
    zero, like `std::round` in the TensorFlow kernel. `min_val` and `max_val`
    must already satisfy `min <= 0 <= max` (see `quant_range`).

    Args:
        min_val: float32 tensor, scalar or per channel.
        max_val: float32 tensor of the same shape.
        num_bits: Integer in `[2, 16]`.
        narrow_range: Whether the grid starts at 1 instead of 0.

    Returns:
        A tuple of three float32 tensors of the shape of `min_val`.
    """
    qmin, qmax = quant_levels(num_bits, narrow_range)
    qmin = tf.constant(qmin, tf.float32)
    qmax = tf.constant(qmax, tf.float32)
    scale = (max_val - min_val) / (qmax - qmin)
    # A zero-width range has scale 0 and the nudged range [0, 0] whatever
    # the zero point; divide_no_nan keeps that zero point finite (qmin).
    zero_point_from_min = qmin - tf.math.divide_no_nan(min_val, scale)
    # Half away from zero; zero_point_from_min >= qmin >= 0 here.
    rounded = tf.floor(zero_point_from_min + 0.5)
    zero_point = tf.clip_by_value(rounded, qmin, qmax)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale, scale


def grid_scale(min_val, max_val, num_bits=8, symmetric=False, narrow_range=False):
    """Returns the step of the grid that `fake_quant` uses for a range.

    That is `nudged_range(*quant_range(min_val, max_val, symmetric), ...)`'s
    scale: the scale an integer model stores for the quantized tensor.

    Args:
        min_val: float32 tensor, scalar or per channel.
        max_val: float32 tensor of the same shape.
        num_bits: Integer in `[2, 16]`.
        symmetric: Whether the range is made symmetric first.
        narrow_range: Whether the grid starts at 1 instead of 0.

    Returns:
        A float32 tensor of the shape of `min_val`.
    """
    low, high = quant_range(tf.cast(min_val, tf.float32), tf.cast(max_val, tf.float32), symmetric)
    qmin, qmax = quant_levels(num_bits, narrow_range)
    return stored_scale.converter_scale(low, high, float(qmax - qmin))


def round_half_away_from_zero(x, tie_tolerance=0.0):
    """Rounds to the nearest integer, ties away from zero (`std::round`).

    `tie_tolerance` moves values that lie that close below a tie onto it, for
    values known to be ties up to float error (averages of grid values).
    """
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5 + tie_tolerance)


def batch_range(x, reduce_axes=None):
    """Returns `(min, max)` of `x`, made to contain 0, in float32.

    Non-finite values make the result non-finite (NaN propagates through
    TensorFlow's reductions); callers skip such batches. An empty `x` gives
    `(0, 0)`.

    Args:
        x: Tensor; reduced in float32.
        reduce_axes: Axes to reduce, `None` for all (a per-tensor range).

    Returns:
        Two float32 tensors.
    """
    x = tf.cast(x, tf.float32)
    batch_min = tf.reduce_min(x, axis=reduce_axes)
    batch_max = tf.reduce_max(x, axis=reduce_axes)
    return tf.minimum(batch_min, 0.0), tf.maximum(batch_max, 0.0)


def int32_bias(bias, scale):
    """Rounds `bias` to the int32 grid on which integer kernels add it.

    An integer conv or matmul accumulates `input * weight` in int32 at scale
    `input_scale * weight_scale` and adds its bias there: TFLite stores the
    bias as `round(bias / scale)` (half away from zero) in int32. This
    returns that value times `scale`, with a straight-through gradient for
    `bias`. Where `scale` is 0 (an all-zero weight channel) `bias` is kept.

    Args:
        bias: Floating-point tensor.
        scale: float32 tensor broadcastable to `bias`, usually
            `input_scale * weight_scale` per output channel.

    Returns:
        A tensor of the shape and dtype of `bias`.

    Example:

    >>> int32_bias(tf.constant([0.26, -0.25]), 0.1).numpy()
    array([ 0.3, -0.3], dtype=float32)
    """
    bias = tf.convert_to_tensor(bias)
    value = tf.cast(bias, tf.float32)
    scale = tf.cast(scale, tf.float32)
    levels = tf.math.divide_no_nan(value, scale)
    rounded = round_half_away_from_zero(levels) * scale
    rounded = tf.where(scale > 0, rounded, value)
    return bias + tf.stop_gradient(tf.cast(rounded, bias.dtype) - bias)


def bias_on_grid(bias, input_scale, weight_scale):
    """`bias` on the int32 grid on which the integer kernel adds it.

    An integer conv or matmul accumulates `input * weight` in int32 at scale
    `input_scale * weight_scale` and adds its bias there (Jacob et al. 2018,
    section 2.4). `input_scale` is the input's scale (from the `FakeQuant`
    before the layer, 0 while it does not quantize), or None when unknown:
    the bias then stays float, as it does where a scale is 0.
    """
    if input_scale is None:
        return bias
    return int32_bias(bias, tf.cast(input_scale, tf.float32) * weight_scale)


def _fake_quant_last_axis(x, min_val, max_val, num_bits, narrow_range, clip_gradient):
    """Fake quant on float32 `x`, per tensor or along its last axis."""
    per_channel = min_val.shape.rank == 1
    if per_channel:
        forward = tf.quantization.fake_quant_with_min_max_vars_per_channel
        backward = tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient
    else:
        forward = tf.quantization.fake_quant_with_min_max_vars
        backward = tf.quantization.fake_quant_with_min_max_vars_gradient

    if not clip_gradient:

        @tf.custom_gradient
        def straight_through(x):
            y = forward(x, min_val, max_val, num_bits=num_bits, narrow_range=narrow_range)
            return y, lambda dy: dy

        return straight_through(x)

    @tf.custom_gradient
    def quantize(x, min_val, max_val):
        def grad(dy):
            return backward(dy, x, min_val, max_val, num_bits=num_bits, narrow_range=narrow_range)

        y = forward(x, min_val, max_val, num_bits=num_bits, narrow_range=narrow_range)
        return y, grad

    return quantize(x, min_val, max_val)


def fake_quant(
    x,
    min_val,
    max_val,
    num_bits=8,
    symmetric=False,
    narrow_range=False,
    axis=None,
    clip_gradient=True,
):
    """Quantizes `x` to an integer grid over `[min_val, max_val]` and back.

    The forward pass is TensorFlow's `fake_quant_with_min_max_vars` (or its
    `_per_channel` variant), so that the TFLite converter recognises it; the
    backward pass, through `tf.custom_gradient`, is TensorFlow's own
    fake-quant gradient: straight-through inside the nudged range (bounds
    included), zero outside, and the gradient of the clipped elements for
    `min_val` / `max_val`. With `clip_gradient=False` the gradient is `dy`
    for every element of `x` and none flows to the range: for a range that
    is `x`'s own min / max (weights), where nothing is clipped but what the
    nudging of the range rounds off (an extreme weight's gradient would be
    zero in TensorFlow's op, and the weight stay where it is for good).

    The range is first made to contain zero and, with `symmetric=True`,
    widened to `[-M, M]`, `M = max(|min_val|, |max_val|)`. With
    `symmetric=True, narrow_range=True` the grid is exactly the signed one,
    `[-(2**(num_bits-1) - 1), 2**(num_bits-1) - 1] * scale`. A zero-width
    range (`min_val == max_val == 0`) maps every value to 0.

    Computation is in float32; float16 and bfloat16 inputs are cast to float32
    and the result is cast back.

    Args:
        x: Floating-point tensor.
        min_val: Lower end of the range; a scalar when `axis=None`, else a
            vector with one value per channel of `x` along `axis`.
        max_val: Upper end of the range, same shape as `min_val`.
        num_bits: Bit width, an integer in `[2, 16]`.
        symmetric: Whether to use a range symmetric around zero.
        narrow_range: Whether to use the grid `[1, 2**num_bits - 1]` instead
            of `[0, 2**num_bits - 1]`.
        axis: `None` for one range for the whole tensor, or the channel axis
            (any axis of `x`, negative values allowed) for one range per
            channel.
        clip_gradient: Whether the gradient is zero outside the nudged range
            (TensorFlow's fake-quant gradient) or `dy` everywhere.

    Returns:
        A tensor of the shape and dtype of `x`.

    Raises:
        ValueError: if `num_bits` is not in `[2, 16]`, `axis` is out of range,
            `x` is not floating point, or the range does not have one value
            per channel.

    Example:

    >>> y = fake_quant(tf.constant([-1.0, 0.1, 0.5]), -1.0, 1.0, num_bits=2)
    >>> y.numpy()  # grid: -2/3, 0, 2/3 after nudging
    array([-0.6666667,  0.       ,  0.6666667], dtype=float32)
    """
    check_num_bits(num_bits)
    _check_constant_range(min_val, max_val)
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise ValueError(
            f"`fake_quant` expects a floating-point tensor. Received: x.dtype={x.dtype.name}"
        )
    min_val, max_val = quant_range(
        tf.cast(min_val, tf.float32), tf.cast(max_val, tf.float32), symmetric
    )
    values = tf.cast(x, tf.float32)
    if axis is None:
        if min_val.shape.rank != 0 or max_val.shape.rank != 0:
            raise ValueError(
                "With `axis=None`, `min_val` and `max_val` must be scalars. "
                f"Received shapes: {min_val.shape} and {max_val.shape}"
            )
        y = _fake_quant_last_axis(values, min_val, max_val, num_bits, narrow_range, clip_gradient)
    else:
        axis = _check_channel_axis(values, axis, min_val, max_val)
        y = _fake_quant_along(values, axis, min_val, max_val, num_bits, narrow_range, clip_gradient)
    return tf.cast(y, x.dtype)


# Activations that integer kernels fuse into the op before them, as the
# clamp they are: name -> (function, upper bound of its output or None).
FUSED_CLAMPS = {"relu": (tf.nn.relu, None), "relu6": (tf.nn.relu6, 6.0)}


def fused_activation(x, activation):
    """`x` through a fused activation (`None`, `"relu"` or `"relu6"`)."""
    return x if activation is None else FUSED_CLAMPS[activation][0](x)


def fake_quant_for_training(
    x, min_val, max_val, num_bits=8, symmetric=False, narrow_range=False, activation=None
):
    """`fake_quant(activation(x))` per tensor, as one op for training.

    The forward values are those of `fake_quant(fused_activation(x,
    activation), min_val, max_val)`; the gradient with respect to `x` is the
    product of the activation's and the fake quant's, exactly as the two ops
    give it: `dy` where the activation passes it (`x > 0`, and `x < 6` for
    relu6) and its output lies in the nudged range, else 0. The range gets
    no gradient (it is a statistic here, not a trainable value).

    What the backward pass keeps is a boolean mask, a quarter of a float32
    tensor, instead of `x` and the activation's output: QAT's extra training
    memory per quantized activation.

    Args:
        x: Floating-point tensor.
        min_val: float32 scalar, the lower end of the range.
        max_val: float32 scalar, the upper end (made to contain 0, and
            symmetric with `symmetric=True`, as in `fake_quant`).
        num_bits: Bit width, an integer in `[2, 16]`.
        symmetric: Whether the range is made symmetric around zero.
        narrow_range: Whether the grid is `[1, 2**num_bits - 1]`.
        activation: `None`, `"relu"` or `"relu6"`.

    Returns:
        A tensor of the shape and dtype of `x`.

    Example:

    >>> x = tf.constant([-1.0, 0.3, 2.0])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = fake_quant_for_training(x, 0.0, 1.0, activation="relu")
    >>> tape.gradient(y, x).numpy()  # ReLU blocks -1, the range blocks 2
    array([0., 1., 0.], dtype=float32)
    """
    min_val, max_val = quant_range(
        tf.cast(min_val, tf.float32), tf.cast(max_val, tf.float32), symmetric
    )
    nudged_min, nudged_max, _ = nudged_range(min_val, max_val, num_bits, narrow_range)

    @tf.custom_gradient
    def quantize(values):
        clamped = fused_activation(values, activation)
        y = tf.quantization.fake_quant_with_min_max_vars(
            clamped, min_val, max_val, num_bits=num_bits, narrow_range=narrow_range
        )
        passes = _passes_gradient(values, nudged_min, nudged_max, activation)

        def grad(dy):
            # A product with the mask, as TensorFlow's ReluGrad and fake-quant
            # gradient compute it: 2-3x faster on the CPU than a select. The
            # float mask waits for `dy`: made as soon as `passes` exists, it
            # would stay alive from the forward pass on, 4 bytes an element.
            with tf.control_dependencies([dy]):
                mask = tf.cast(passes, dy.dtype)
            return dy * mask

        return y, grad

    return tf.cast(quantize(tf.cast(x, tf.float32)), x.dtype)


def _passes_gradient(x, nudged_min, nudged_max, activation):
    """Where the straight-through gradient of `fake_quant(activation(x))`
    is 1: the activation passes (ReluGrad: `x > 0`; Relu6Grad also `x < 6`)
    and its output lies in `[nudged_min, nudged_max]`."""
    if activation is None:
        return tf.logical_and(x >= nudged_min, x <= nudged_max)
    passes = tf.logical_and(x > 0.0, x <= nudged_max)  # nudged_min <= 0 < x
    upper = FUSED_CLAMPS[activation][1]
    return passes if upper is None else tf.logical_and(passes, x < upper)


def _check_constant_range(min_val, max_val):
    """Raises `ValueError` for a range given as numbers (not tensors) that is
    not finite or has min > max; a tensor range is checked by the caller."""
    if tf.is_tensor(min_val) or tf.is_tensor(max_val):
        return
    try:
        low, high = np.asarray(min_val, np.float64), np.asarray(max_val, np.float64)
    except (TypeError, ValueError):
        return  # not numbers: the TensorFlow conversion reports it
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))) or np.any(low > high):
        raise ValueError(
            "Received an invalid range, expected finite bounds with min_val <= max_val. "
            f"Received: min_val={min_val!r}, max_val={max_val!r}"
        )


def _check_channel_axis(x, axis, min_val, max_val):
    """Returns `axis` in `[0, rank)`; raises unless the range has one value
    per channel of `x` along it."""
    rank = x.shape.rank
    if rank is None or not -rank <= axis < rank:
        raise ValueError(
            f"Received an invalid value for `axis`, expected an integer in "
            f"[-{rank}, {rank}) for an input of rank {rank}. "
            f"Received: axis={axis}"
        )
    axis = axis % rank
    channels = x.shape[axis]
    for name, value in (("min_val", min_val), ("max_val", max_val)):
        if value.shape.rank != 1 or (
            channels is not None and value.shape[0] not in (None, channels)
        ):
            raise ValueError(
                f"With `axis={axis}`, `{name}` must be a vector of "
                f"{channels} values, one per channel. "
                f"Received: {name}.shape={value.shape}"
            )
    return axis


def _fake_quant_along(x, axis, min_val, max_val, num_bits, narrow_range, clip_gradient):
    """Per-channel fake quant along `axis` (in `[0, rank)`) of float32 `x`.

    The TensorFlow op takes the channels last, for ranks 1, 2 and 4: other
    axes are moved last and other ranks flattened to 2D, then put back.
    """
    rank = x.shape.rank
    perm = [d for d in range(rank) if d != axis] + [axis]
    moved = x if axis == rank - 1 else tf.transpose(x, perm)
    if rank in (1, 2, 4):
        y = _fake_quant_last_axis(moved, min_val, max_val, num_bits, narrow_range, clip_gradient)
    else:
        flat = tf.reshape(moved, [-1, tf.shape(moved)[-1]])
        y = _fake_quant_last_axis(flat, min_val, max_val, num_bits, narrow_range, clip_gradient)
        y = tf.reshape(y, tf.shape(moved))
    if axis != rank - 1:
        y = tf.transpose(y, [perm.index(d) for d in range(rank)])
    return y
