"""Bilinear resizing on an int8 grid: `QuantUpSampling2D`, `QuantResizing`.

TFLite's int8 RESIZE_BILINEAR writes its output on its input's grid (same
scale and zero point), rounding each interpolated value. Its default CPU
kernel (XNNPACK) computes, for each output pixel, with the source position
`p = (i + 0.5) * (in / out) - 0.5` per axis (float32, half-pixel centres,
the two neighbours clamped to the image) and the weight `a = p - floor(p)`
stored as `round(a * 2048)` (11 fractional bits):

    top    = (tl << 11) + (tr - tl) * a_x
    bottom = (bl << 11) + (br - bl) * a_x
    out    = ((top << 11) + (bottom - top) * a_y + 2**21) >> 22

in integers (checked against the kernel on every output of several
resizes: docs/measurements.md). These layers compute Keras' float resize of their
fake-quantized input and replace its value by that integer result (a
straight-through gradient), given the input's grid step (`input_scale`, from
the `FakeQuant` before them). Without a grid (or with a zero one, during a
quant delay) they compute the float resize.
"""

import keras
import tensorflow as tf

from keras_qat.layers.call_context import is_tracing_for_export

_FRACTION_BITS = 11  # XNNPACK's interpolation weights: Q11


def _axis_weights(size_in, size_out):
    """Per output position of one axis: the lower and upper source index
    and the Q11 weight of the upper one."""
    scale = tf.cast(size_in, tf.float32) / tf.cast(size_out, tf.float32)
    position = (tf.range(size_out, dtype=tf.float32) + 0.5) * scale - 0.5
    low = tf.floor(position)
    weight = tf.cast(tf.round((position - low) * 2.0**_FRACTION_BITS), tf.int64)
    last = tf.cast(size_in - 1, tf.float32)
    lower = tf.cast(tf.clip_by_value(low, 0.0, last), tf.int32)
    upper = tf.cast(tf.clip_by_value(low + 1.0, 0.0, last), tf.int32)
    return lower, upper, weight


def bilinear_on_grid(on_grid, grid, size):
    """The int8 kernel's bilinear resize of `on_grid` (4D, channels last,
    values on the grid of step `grid` > 0) to `size` (height, width), as
    float values on the same grid."""
    values = tf.cast(tf.round(tf.cast(on_grid, tf.float32) / grid), tf.int64)  # q - zero point
    shape = tf.shape(on_grid)
    top, bottom, weight_y = _axis_weights(shape[1], size[0])
    left, right, weight_x = _axis_weights(shape[2], size[1])
    rows = [tf.gather(values, index, axis=1) for index in (top, bottom)]
    tl, tr, bl, br = (tf.gather(row, index, axis=2) for row in rows for index in (left, right))
    weight_x = weight_x[None, None, :, None]
    weight_y = weight_y[None, :, None, None]
    bits = _FRACTION_BITS
    upper = tf.bitwise.left_shift(tl, bits) + (tr - tl) * weight_x
    lower = tf.bitwise.left_shift(bl, bits) + (br - bl) * weight_x
    total = tf.bitwise.left_shift(upper, bits) + (lower - upper) * weight_y
    rounded = tf.bitwise.right_shift(total + 2 ** (2 * bits - 1), 2 * bits)
    return tf.cast(rounded, tf.float32) * grid


def resized_on_grid(resized, inputs, input_scale):
    """`resized` (Keras' float resize of `inputs`) with the int8 kernel's
    values when `input_scale` is a positive step, straight-through. Traced
    for export, the float resize: the converter makes it the int8 kernel."""
    if input_scale is None or is_tracing_for_export():
        return resized
    grid = tf.cast(input_scale, tf.float32)
    safe_grid = tf.where(grid > 0, grid, 1.0)
    size = tf.shape(resized)[1:3]
    on_grid = tf.cast(bilinear_on_grid(inputs, safe_grid, size), resized.dtype)
    on_grid = tf.where(grid > 0, on_grid, resized)
    return resized + tf.stop_gradient(on_grid - resized)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantUpSampling2D(keras.layers.UpSampling2D):
    """`UpSampling2D(interpolation="bilinear")` rounded as TFLite's int8
    RESIZE_BILINEAR rounds (see the module docstring).

    Args:
        size, data_format, interpolation: As in `keras.layers.UpSampling2D`
            (`interpolation="bilinear"`, channels last).
        **kwargs: Base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: A 4D tensor on the grid of step `input_scale`.
        input_scale: The step of the input's grid (a scalar), or None.

    Example:

    >>> layer = QuantUpSampling2D(2, interpolation="bilinear")
    >>> x = np.array([0.0, 0.1, 0.2, 0.5], "float32").reshape(1, 2, 2, 1)
    >>> y = layer(x, input_scale=0.1)[0, :2, :, 0].numpy()
    >>> (y / 0.1).round(3).astype("float64").tolist()  # on the grid
    [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]]
    """

    def call(self, inputs, input_scale=None):
        return resized_on_grid(super().call(inputs), inputs, input_scale)


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantResizing(keras.layers.Resizing):
    """`Resizing(interpolation="bilinear")` rounded as TFLite's int8
    RESIZE_BILINEAR rounds (see the module docstring).

    Args:
        height, width, interpolation, data_format: As in
            `keras.layers.Resizing` (`interpolation="bilinear"`, channels
            last, no cropping, padding or antialiasing).
        **kwargs: Base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: A 4D tensor on the grid of step `input_scale`.
        input_scale: The step of the input's grid (a scalar), or None.

    Example:

    >>> layer = QuantResizing(3, 3)
    >>> x = np.array([0.0, 0.1, 0.2, 0.5], "float32").reshape(1, 2, 2, 1)
    >>> y = layer(x, input_scale=0.1)[0, :, :, 0].numpy()
    >>> (y / 0.1).round(3).astype("float64").tolist()
    [[0.0, 1.0, 1.0], [1.0, 2.0, 3.0], [2.0, 4.0, 5.0]]
    """

    def call(self, inputs, input_scale=None):
        return resized_on_grid(super().call(inputs), inputs, input_scale)
