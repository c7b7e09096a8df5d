"""`WeightQuantizer`: a layer's weight range, from the kernel itself."""

import collections

import keras
import tensorflow as tf

from keras_qat import quantizers
from keras_qat.layers.call_context import is_tracing_for_export, packs_int4, weight_copy
from keras_qat.layers.quantizer import Quantizer

# How much wider each further copy of the same weights is traced for export
# (see `WeightQuantizer._on_export_grid`): 2**-20, so that 127 levels of up
# to a few hundred copies still round to themselves.
COPY_STRETCH = 2.0**-20

QuantizedWeights = collections.namedtuple("QuantizedWeights", "values scale active")
QuantizedWeights.__doc__ = """A fake-quantized kernel.

`values` (the kernel, fake-quantized when `active`), `scale` (the grid
step, per output channel or not; 0 when not `active`, so that a bias rounded
to `input_scale * scale` stays float) and `active` (a boolean tensor, or
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

    def quantize_weights(self, kernel, training=False, int4_storage=False):
        """Fake-quantizes `kernel` (float32) once the quant delay has passed.

        A training call counts a step. Kernels are small, so both versions
        are computed and one is selected (`tf.where`, not `tf.cond`): no
        control flow, and the gradient of the chosen one flows.
        `int4_storage`: whether the int8 op that takes these weights can
        store them as INT4 (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED; not
        TRANSPOSE_CONV, GATHER or the MUL / ADD of a layer norm), for an
        export with `pack_int4`.

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
            on_grid = self._on_export_grid(quantized, scale, int4_storage)
            return QuantizedWeights(on_grid, scale, True)
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

    def _on_export_grid(self, quantized, scale, int4_storage):
        """Quantized weights as the TFLite converter must see them.

        The converter stores fake-quantized weights of 4 bits as INT4 and of
        8 bits as int8, and re-grids other widths (3-bit levels came out as
        other int8 levels). A symmetric k-bit grid is a subset of the 4- or
        8-bit grid of the same scale, so k-bit weights are traced as a 4-bit
        (k < 4, when INT4 is wanted) or 8-bit fake quant whose range gives
        that scale: the stored levels are the trained ones, exactly. Where
        the op takes no INT4 operand (`int4_storage=False`), 4-bit and
        narrower weights are stored as int8 with their levels.

        Weights that the model quantizes more than once with the same values
        (a shared layer, equal kernels) would trace to one constant used by
        several ops, which the converter requantizes with scales of its own
        (the trained levels were lost). Copy `n` (`weight_copy`, from 1) is
        traced on a grid `n * COPY_STRETCH` wider: a distinct constant with
        the same levels, whose scale differs from the trained one by about
        1e-6 per copy, relatively.
        """
        bits = self.num_bits
        carrier = 4 if bits <= 4 and packs_int4() and int4_storage else 8
        copy = weight_copy(self)
        regrid = bits not in (carrier, 8) or copy > 0
        if not regrid or bits > 8 or not (self.symmetric and self.narrow_range):
            return quantized
        bound = (2 ** (carrier - 1) - 1) * scale * (1.0 + copy * COPY_STRETCH)
        return quantizers.fake_quant(
            quantized,
            -bound,
            bound,
            num_bits=carrier,
            symmetric=True,
            narrow_range=True,
            axis=-1 if self.per_channel else None,
        )
