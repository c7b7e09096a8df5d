"""Attention masks: the scores a mask excludes set to a large negative value.

`MultiHeadAttention` adds a large negative number to the scores its mask
excludes before the softmax, so that they get no weight. On an int8 grid a
large negative number is the grid's bottom: TFLite computes a masked
softmax as SELECT_V2(mask, scores, bottom), whose int8 kernel takes one
scale for both value operands and its output (measured: the converter
stores the constant on the scores' grid). `AttentionScoreMask` is that
step in float; `QuantAttentionScoreMask` quantizes the scores with its own
range and puts the excluded ones at the bottom of that grid, as the int8
model does. `keras_qat.transforms.attention` builds them from a
`MultiHeadAttention`'s `attention_mask` and `use_causal_mask`.
"""

import keras
import tensorflow as tf

from keras_qat.config import check_bool
from keras_qat.layers.fake_quant import FakeQuant

ops = keras.ops


def _large_negative(dtype):
    """What Keras' masked softmax adds to excluded scores, per dtype."""
    return -3e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


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
        if self.causal:
            shape = ops.shape(scores)
            causal = ops.greater_equal(
                ops.expand_dims(ops.arange(shape[-2]), -1),
                ops.expand_dims(ops.arange(shape[-1]), 0),
            )
            mask = causal if mask is None else ops.logical_and(mask, causal)
        return scores, mask

    def call(self, inputs):
        scores, keep = self.keep(inputs)
        if keep is None:
            return scores
        return ops.where(keep, scores, ops.cast(_large_negative(scores.dtype), scores.dtype))

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, list) and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["causal"] = self.causal
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantAttentionScoreMask(AttentionScoreMask):
    """`AttentionScoreMask` on an int8 grid.

    The scores are fake-quantized with the range of the `FakeQuant`
    sub-layer `quantizer` (learned from all scores, excluded ones too: the
    int8 BATCH_MATMUL computes them all), and the excluded ones are set to
    the bottom of that grid, the most negative value the int8 model can
    store (TFLite's SELECT_V2 keeps its operands' grid). While quantization
    is inactive (quant delay) the layer computes what `AttentionScoreMask`
    computes.

    Args:
        causal: As in `AttentionScoreMask`.
        quantizer: The scores' range: a `FakeQuant`, a dict of its options,
            or None for the defaults.
        **kwargs: Base layer keyword arguments, such as `name`.

    Example:

    >>> layer = QuantAttentionScoreMask(causal=True)
    >>> scores = np.array([[[[1.0, 2.0], [-1.0, 0.5]]]], "float32")
    >>> outputs = layer(scores, training=True)[0, 0].numpy()
    >>> outputs.astype("float64").round(3).tolist()  # on the grid of [-1, 2]
    [[1.0, -1.0], [-1.0, 0.506]]
    """

    def __init__(self, causal=False, quantizer=None, **kwargs):
        super().__init__(causal=causal, **kwargs)
        self.quantizer = FakeQuant.get(quantizer, "quantizer")

    def build(self, input_shape):
        scores_shape = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        if not self.quantizer.built:  # built when loaded
            self.quantizer.build(scores_shape)
        self.built = True

    def call(self, inputs, training=False):
        scores, keep = self.keep(inputs)
        quantizer = self.quantizer
        min_val, max_val, active = quantizer.observe(scores, training)
        quantized = quantizer.quantize_with(scores, min_val, max_val, active, training)
        if keep is None:
            return quantized
        large_negative = tf.constant(_large_negative(scores.dtype), scores.dtype)
        # The bottom of the grid: where the fake quant clamps any value below it.
        bottom = quantizer.fake_quant(large_negative, min_val, max_val)
        if active is False:
            bottom = large_negative
        elif active is not True:
            bottom = tf.where(active, bottom, large_negative)
        return tf.where(keep, quantized, tf.cast(bottom, quantized.dtype))

    def get_config(self):
        config = super().get_config()
        config["quantizer"] = keras.saving.serialize_keras_object(self.quantizer)
        return config
