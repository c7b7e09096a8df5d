"""Attention masks: the scores a mask excludes set to a large negative value.

`MultiHeadAttention` adds a large negative number to the scores its mask
excludes before the softmax, so that they get no weight. On an int8 grid a
large negative number is the grid's bottom: TFLite computes a masked
softmax as SELECT_V2(mask, scores, bottom), whose int8 kernel takes one
scale for both value operands and its output (measured: the converter
stores the constant on the scores' grid). `AttentionScoreMask` is that
step in float; `QuantAttentionScoreMask` quantizes the scores with its own
range and puts the excluded ones at the bottom of that grid, as the int8
model does. Tracing (`keras_qat.transforms.operation_forms`) builds them
from the masks of `dot_product_attention` and of a `Softmax` called with a
mask, which is how `MultiHeadAttention` applies its `attention_mask` and
`use_causal_mask`.
"""

import keras
import tensorflow as tf

from keras_qat.config import check_bool
from keras_qat.layers.fake_quant import FakeQuant

ops = keras.ops


# Softmax-input units between the lowest kept score and a masked one: a
# masked key then gets at most exp(-7) < 1 / 512 of the weight of the row's
# largest score, which int8 softmax (output step 1 / 256) rounds to 0.
MASK_GAP = 7.0


def _large_negative(dtype):
    """What Keras' masked softmax adds to excluded scores, per dtype."""
    return -3e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


def scores_shape(input_shape):
    """The shape of the scores (or weights) among a mask layer's inputs."""
    if isinstance(input_shape, list) and isinstance(input_shape[0], (list, tuple)):
        return tuple(input_shape[0])
    return tuple(input_shape)


def kept_positions(inputs, causal):
    """`(scores, keep)` of `scores` or `[scores, attention_mask]`: where the
    scores are kept (boolean, broadcastable to the scores; with `causal`,
    query `i` keeps keys `j <= i` only), or None when nothing is excluded."""
    scores, mask = (inputs, None) if not isinstance(inputs, (list, tuple)) else inputs
    if mask is not None:
        mask = ops.cast(mask, "bool")
        if len(mask.shape) == len(scores.shape) - 1:
            mask = ops.expand_dims(mask, -3)  # the same mask for every head
        elif len(mask.shape) != len(scores.shape):
            raise ValueError(
                "`attention_mask` must have the shape (batch, queries, keys) or "
                f"the scores' shape {tuple(scores.shape)}. Received: "
                f"attention_mask.shape={tuple(mask.shape)}"
            )
    if causal:
        shape = ops.shape(scores)
        lower = ops.greater_equal(
            ops.expand_dims(ops.arange(shape[-2]), -1),
            ops.expand_dims(ops.arange(shape[-1]), 0),
        )
        mask = lower if mask is None else ops.logical_and(mask, lower)
    return scores, mask


@keras.saving.register_keras_serializable(package="keras_qat")
class AttentionScoreMask(keras.layers.Layer):
    """Sets the attention scores that a mask excludes to a large negative
    value, so that a softmax over the last axis gives them no weight.

    Called on `scores` of shape `(batch, heads, queries, keys)`, or on
    `[scores, attention_mask]` with a boolean (or 0 / 1) `attention_mask`
    of shape `(batch, queries, keys)` (the same for every head) or of the
    scores' shape: `True` keeps a score. With `causal=True`, query `i`
    also excludes keys `j > i`, as `use_causal_mask=True` does in
    `MultiHeadAttention`.

    Args:
        causal: Whether to exclude the keys after each query too.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> scores = np.zeros((1, 1, 2, 2), "float32")
    >>> AttentionScoreMask(causal=True)(scores)[0, 0].numpy().tolist()
    [[0.0, -1000000000.0], [0.0, 0.0]]
    """

    def __init__(self, causal=False, **kwargs):
        super().__init__(**kwargs)
        self.causal = check_bool("causal", causal)
        self.supports_masking = False

    def keep(self, inputs):
        """The scores and where they are kept (boolean, broadcastable to
        the scores), or None when nothing is excluded."""
        return kept_positions(inputs, self.causal)

    def call(self, inputs):
        scores, keep = self.keep(inputs)
        if keep is None:
            return scores
        return ops.where(keep, scores, ops.cast(_large_negative(scores.dtype), scores.dtype))

    def compute_output_shape(self, input_shape):
        return scores_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["causal"] = self.causal
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantAttentionScoreMask(AttentionScoreMask):
    """`AttentionScoreMask` on an int8 grid.

    The `FakeQuant` sub-layer `quantizer` learns the scores' range (from
    all scores, excluded ones too: the int8 BATCH_MATMUL computes them all).
    The scores' grid reaches `MASK_GAP` (7) below that range: the scores
    are fake-quantized on it, kept ones raised to at least the range's
    minimum (an int8 MAXIMUM), excluded ones set to the bottom of the grid
    (SELECT_V2, whose constant the converter stores on the scores' grid).
    A masked key is then at least 7 below the largest kept score of its
    row, and gets a softmax weight below 1 / 512, which int8 softmax rounds
    to 0 (at the bottom of the learned range itself, rows whose kept scores
    are all low gave their masked keys weight: docs/measurements.md).
    While quantization is inactive (quant delay) the layer computes what
    `AttentionScoreMask` computes.

    Args:
        causal: As in `AttentionScoreMask`.
        quantizer: The scores' range: a `FakeQuant`, a dict of its options,
            or None for the defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantAttentionScoreMask(causal=True)
    >>> scores = np.array([[[[1.0, 2.0], [-1.0, 0.5]]]], "float32")
    >>> outputs = layer(scores, training=True)[0, 0].numpy()
    >>> outputs.astype("float64").round(3).tolist()  # on the grid of [-8, 2]
    [[0.98, -8.0], [-0.98, 0.51]]
    """

    def __init__(self, causal=False, quantizer=None, **kwargs):
        super().__init__(causal=causal, **kwargs)
        self.quantizer = FakeQuant.get(quantizer, "quantizer")

    def build(self, input_shape):
        scores_shape = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        if not self.quantizer.built:  # built when loaded
            self.quantizer.build(scores_shape)
        self.built = True

    def quantizers(self):
        """`{"output": quantizer}`: the scores' range (`keras_qat.quantizer_roles`)."""
        return {"output": self.quantizer}

    def grid_range(self, min_val=None, max_val=None):
        """The range of the scores' grid for a learned range (by default the
        quantizer's): `MASK_GAP` below it, so that a masked score lies that
        far below every kept one."""
        min_val = self.quantizer.min if min_val is None else min_val
        max_val = self.quantizer.max if max_val is None else max_val
        return min_val - MASK_GAP, max_val

    def call(self, inputs, training=False):
        scores, keep = self.keep(inputs)
        quantizer = self.quantizer
        min_val, max_val, active = quantizer.observe(scores, training)
        if keep is None:
            return quantizer.quantize_with(scores, min_val, max_val, active, training)
        low, high = self.grid_range(min_val, max_val)
        quantized = quantizer.quantize_with(scores, low, high, active, training)
        # Kept scores: at least the grid value of the learned minimum.
        floor = quantizer.fake_quant(tf.cast(min_val, quantized.dtype), low, high)
        large_negative = tf.constant(_large_negative(scores.dtype), scores.dtype)
        bottom = quantizer.fake_quant(large_negative, low, high)  # where the grid ends
        on_grid = tf.where(keep, tf.maximum(quantized, floor), tf.cast(bottom, quantized.dtype))
        if active is True:
            return on_grid
        unquantized = tf.where(keep, scores, large_negative)
        return unquantized if active is False else tf.where(active, on_grid, unquantized)

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class AttentionWeightMask(keras.layers.Layer):
    """Sets the attention weights that a mask excludes to 0.

    `MultiHeadAttention` with `dropout > 0` or `return_attention_scores=True`
    computes a masked softmax (Keras' `Softmax` layer with a mask), which
    multiplies the weights by the mask: an excluded key gets exactly 0, and
    a query whose keys are all excluded (padding) gets a row of zeros, not
    the uniform row of a plain softmax. In the int8 model this is a
    SELECT_V2 of the weights and 0, which lies on the softmax's grid: the
    output keeps its input's grid.

    Called on `[weights, attention_mask]`, or on `weights` alone with
    `causal=True`; masks as in `AttentionScoreMask`.

    Args:
        causal: Whether to exclude the keys after each query too.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> weights = np.full((1, 1, 2, 2), 0.5, "float32")
    >>> mask = np.array([[[True, False], [False, False]]])
    >>> AttentionWeightMask()([weights, mask])[0, 0].numpy().tolist()
    [[0.5, 0.0], [0.0, 0.0]]
    """

    def __init__(self, causal=False, **kwargs):
        super().__init__(**kwargs)
        self.causal = check_bool("causal", causal)

    def call(self, inputs):
        weights, keep = kept_positions(inputs, self.causal)
        if keep is None:
            return weights
        return ops.where(keep, weights, ops.cast(0.0, weights.dtype))

    def compute_output_shape(self, input_shape):
        return scores_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["causal"] = self.causal
        return config
