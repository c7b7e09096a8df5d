"""decompose_attention: `MultiHeadAttention` as the layers and operations
its int8 model is made of.

TFLite has no attention kernel: an int8 model computes multi-head attention
as FULLY_CONNECTED projections, BATCH_MATMULs, a MUL by `1 / sqrt(key_dim)`,
a SOFTMAX and transposes and reshapes between them, each rounding its result
(or keeping its input's grid). This transform rewrites each
`MultiHeadAttention` call as exactly that graph of Keras layers and
operations, with the layer's weights:

    q = Permute((2, 1, 3))(Reshape((-1, heads, key_dim))(Dense(query)))
    k = Permute((2, 3, 1))(Reshape((-1, heads, key_dim))(Dense(key)))
    v = Permute((2, 1, 3))(Reshape((-1, heads, value_dim))(Dense(value)))
    scores = matmul(q * (1 / sqrt(key_dim)), k)
    scores = AttentionScoreMask(causal)([scores, attention_mask])  # with a mask
    weights = Softmax()(scores)                                     # + Dropout
    context = Reshape((-1, heads * value_dim))(Permute((2, 1, 3))(matmul(weights, v)))
    outputs = Dense(context)

The projections' `EinsumDense` kernels `(d, heads, key_dim)` become `Dense`
kernels `(d, heads * key_dim)`, the output's `(heads, value_dim, d_out)` a
`(heads * value_dim, d_out)` one; the result computes what the layer
computes, to float rounding, and is then fused and quantized like any other
graph (`keras_qat.int8_rules` says where each op rounds). The new layers are
named after the attention layer: `<name>_query`, `<name>_key`, `<name>_value`,
`<name>_output`, ...

An `attention_mask` and `use_causal_mask=True` become an
`AttentionScoreMask` between the scores and the softmax (SELECT_V2 in the
int8 model), and `return_attention_scores=True` returns the softmax's
output too, as the layer does. Calls with Keras masks on their inputs
(`query_mask`, `value_mask`, `key_mask`, or the masks of masked inputs), and
layers with `attention_axes`, a gate or a sliding window, are left as they
are (`convert_quant_network` then lists them, with the reason; the layers
that make masked inputs, `Embedding(mask_zero=True)` and `Masking`, are
refused themselves).
"""

import math

import keras

from keras_qat import graph
from keras_qat.layers.attention_mask import AttentionScoreMask, AttentionWeightMask
from keras_qat.transforms.decomposition import Decomposition

L = keras.layers

# Call arguments of MultiHeadAttention that the decomposition does not take
# (besides query, value, key, attention_mask, use_causal_mask,
# return_attention_scores and training), when they are set.
_UNSUPPORTED_CALL_ARGUMENTS = ("query_mask", "value_mask", "key_mask")
# Call arguments of keras-hub's CachedMultiHeadAttention (a subclass): a
# cache for step-by-step generation, not quantized.
_CACHE_ARGUMENTS = ("cache", "cache_update_index")

# Options of MultiHeadAttention that it passes to its four projections
# (EinsumDense layers), carried into the Dense layers that replace them (the
# weights are copied, so initializers do not matter). A regularizer or constraint that
# depends on the kernel's shape (OrthogonalRegularizer, a norm constraint
# over another axis than 0) sees the Dense kernels' `(d, heads * key_dim)`
# and `(heads * value_dim, d_out)` shapes.
_CARRIED_OPTIONS = (
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


def unsupported_reason(layer):
    """Why a `MultiHeadAttention` cannot be decomposed here, or None."""
    config = layer.get_config()
    axes = config.get("attention_axes")
    if axes is not None and tuple(axes) not in ((1,), (-2,)):
        # Keras stores the default, once built, as (1,) for (batch, seq, d).
        return f"attention_axes={axes}: only attention over the sequence axis"
    for option in ("use_gate", "sliding_window"):
        if config.get(option):
            return f"{option}={config[option]!r}: not quantized"
    output_shape = config.get("output_shape")
    if isinstance(output_shape, (list, tuple)) and len(output_shape) != 1:
        return f"output_shape={output_shape}: only one output dimension"
    for args, kwargs in graph.node_arguments(layer):
        query = args[0] if args else kwargs.get("query")
        rank = len(query.shape) if query is not None else 3
        if rank != 3:
            return (
                f"a {rank}D query: attention over one sequence axis of (batch, sequence, "
                "features) inputs only; reshape to 3D first"
            )
        cached = [name for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None]
        if cached:
            return f"called with {', '.join(cached)}: a generation cache is not quantized"
        used = [name for name in _UNSUPPORTED_CALL_ARGUMENTS if kwargs.get(name) is not None]
        if len(args) > 3 or used:
            return (
                f"called with {', '.join(used) or 'masks'} (Keras masks of its inputs): "
                "not quantized; pass an attention_mask instead"
            )
    return None


class _Decomposition:
    """The layers of one MultiHeadAttention and the copy of its weights."""

    def __init__(self, mha, prefix=None):
        config = mha.get_config()
        self.mha = mha
        self.prefix = prefix or mha.name
        self.heads = config["num_heads"]
        self.key_dim = config["key_dim"]
        self.value_dim = config["value_dim"] or self.key_dim
        use_bias = config["use_bias"]
        name = self.prefix
        common = dict(use_bias=use_bias, dtype=mha.dtype_policy, trainable=mha.trainable)
        common.update({key: config[key] for key in _CARRIED_OPTIONS if config.get(key) is not None})
        width = mha.output_dense.kernel.shape[-1]
        self.query = L.Dense(self.heads * self.key_dim, name=f"{name}_query", **common)
        self.key = L.Dense(self.heads * self.key_dim, name=f"{name}_key", **common)
        self.value = L.Dense(self.heads * self.value_dim, name=f"{name}_value", **common)
        self.output = L.Dense(width, name=f"{name}_output", **common)
        self.softmax = L.Softmax(axis=-1, name=f"{name}_softmax")
        self.dropout = L.Dropout(config["dropout"], name=f"{name}_dropout")
        self.masks = {}  # causal -> AttentionScoreMask

    def mask(self, causal):
        """The AttentionScoreMask layer of this attention (one per kind)."""
        if causal not in self.masks:
            suffix = "causal_mask" if causal else "mask"
            self.masks[causal] = AttentionScoreMask(causal, name=f"{self.prefix}_{suffix}")
        return self.masks[causal]

    def masked_softmax(self, return_attention_scores):
        """Whether Keras computes this call with its masked softmax (which
        zeroes excluded weights), not `dot_product_attention`."""
        return self.dropout.rate > 0.0 or bool(return_attention_scores)

    def weight_mask(self, causal):
        """The AttentionWeightMask layer of this attention (one per kind)."""
        if ("weights", causal) not in self.masks:
            suffix = "causal_weight_mask" if causal else "weight_mask"
            self.masks[("weights", causal)] = AttentionWeightMask(
                causal, name=f"{self.prefix}_{suffix}"
            )
        return self.masks[("weights", causal)]

    def __call__(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        use_causal_mask=False,
        return_attention_scores=False,
        training=None,
        **masks,
    ):
        """The layer's call, as the graph; `masks` (query_mask, value_mask,
        key_mask) are None here (`unsupported_reason` refuses others)."""
        key = value if key is None else key
        heads = self.heads
        q = L.Permute((2, 1, 3))(L.Reshape((-1, heads, self.key_dim))(self.query(query)))
        k = L.Permute((2, 3, 1))(L.Reshape((-1, heads, self.key_dim))(self.key(key)))
        v = L.Permute((2, 1, 3))(L.Reshape((-1, heads, self.value_dim))(self.value(value)))
        scores = keras.ops.matmul(q * (1.0 / math.sqrt(float(self.key_dim))), k)
        if attention_mask is not None:
            scores = self.mask(bool(use_causal_mask))([scores, attention_mask])
        elif use_causal_mask:
            scores = self.mask(True)(scores)
        attention_scores = self.softmax(scores)
        if self.masked_softmax(return_attention_scores):  # Keras' path: excluded keys get 0
            if attention_mask is not None:
                attention_scores = self.weight_mask(bool(use_causal_mask))(
                    [attention_scores, attention_mask]
                )
            elif use_causal_mask:
                attention_scores = self.weight_mask(True)(attention_scores)
        weights = self.dropout(attention_scores, training=training)
        context = L.Permute((2, 1, 3))(keras.ops.matmul(weights, v))
        context = L.Reshape((-1, heads * self.value_dim))(context)
        outputs = self.output(context)
        return (outputs, attention_scores) if return_attention_scores else outputs

    def copy_weights(self):
        mha = self.mha
        pairs = (
            (self.query, mha.query_dense),
            (self.key, mha.key_dense),
            (self.value, mha.value_dense),
            (self.output, mha.output_dense),
        )
        for dense, einsum in pairs:
            weights = [einsum.kernel.numpy().reshape(dense.kernel.shape)]
            if dense.use_bias:
                weights.append(einsum.bias.numpy().reshape(dense.bias.shape))
            dense.set_weights(weights)


DECOMPOSITION = Decomposition(
    L.MultiHeadAttention,
    matches=lambda operation: isinstance(operation, L.MultiHeadAttention),
    unsupported_reason=unsupported_reason,
    build=_Decomposition,
)


def decompose_attention(model, skipped=()):
    """Returns `model` with each decomposable `MultiHeadAttention` call
    (not named in `skipped`) rewritten as Dense layers and Keras operations
    (see the module docstring); other layers are cloned with their weights."""
    return DECOMPOSITION.rewrite(model, skipped)
