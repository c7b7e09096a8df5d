"""Decompositions: a Keras layer rewritten as the layers and operations its
int8 model is made of.

TFLite has no kernel for some Keras layers (`MultiHeadAttention`, an
`EinsumDense` with more than one output axis); their int8 model is a graph
of FULLY_CONNECTED, BATCH_MATMUL, reshapes and so on. A `Decomposition`
says which layers it rewrites (`matches`), why a matching layer cannot be
rewritten (`unsupported_reason`) and how one layer becomes its graph
(`build(layer)`: an object called like the layer, with `copy_weights()`).
`rewrite` then rebuilds a model with every such layer replaced; placement
treats the result like any other graph.
"""

from keras_qat import graph
from keras_qat.transforms.clones import Clones


class Decomposition:
    """One kind of layer that conversion rewrites as a graph.

    Args:
        layer_class: The Keras layer class rewritten (for messages).
        matches: `operation -> bool`, whether the decomposition is for it.
        unsupported_reason: `layer -> str or None`, why a matching layer
            cannot be rewritten (its option and what to do), or None.
        build: `(layer, prefix) -> rewritten`, where `rewritten(*args,
            **kwargs)` computes the layer's call on symbolic tensors (its
            layers named `<prefix>_...`) and `rewritten.copy_weights()`
            copies its weights once built.
    """

    def __init__(self, layer_class, matches, unsupported_reason, build):
        self.layer_class = layer_class
        self.matches = matches
        self.unsupported_reason = unsupported_reason
        self.build = build

    def applies(self, operation):
        """Whether `operation` is rewritten by this decomposition."""
        return self.matches(operation) and self.unsupported_reason(operation) is None

    def applies_in(self, model, skipped=()):
        """Whether `model` has a layer it rewrites, not named in `skipped`."""
        return has_operation(model, self.applies, skipped)

    def rewrite(self, model, skipped=()):
        """`model` with each layer this decomposition applies to (not named
        in `skipped`) rewritten; other layers cloned with their weights.
        A layer called several times is rewritten once, its graph shared."""
        clones, rewritten = Clones(), {}
        taken = {layer.name for layer in model.layers}

        def call(operation, *args, **kwargs):
            if operation.name in skipped or not self.applies(operation):
                return clones.of(operation)(*args, **kwargs)
            if id(operation) not in rewritten:
                prefix = _free_prefix(operation.name, taken)
                rewritten[id(operation)] = self.build(operation, prefix)
            return rewritten[id(operation)](*args, **kwargs)

        new_model = graph.rebuild(model, call)
        clones.copy_weights()
        for layer_graph in rewritten.values():
            layer_graph.copy_weights()
        return new_model


# The suffixes of the layers a decomposition makes (`<prefix>_query`, ...).
_PART_SUFFIXES = (
    "query",
    "key",
    "value",
    "output",
    "softmax",
    "dropout",
    "mask",
    "causal_mask",
    "weight_mask",
    "causal_weight_mask",
    "flatten",
    "reshape",
)


def _free_prefix(name, taken):
    """`name`, or `<name>_<k>` when a part named `<name>_<suffix>` would
    take another layer's name (keras-hub names an attention
    `self_attention` and the dropout after it `self_attention_dropout`)."""
    prefix, k = name, 1
    while any(f"{prefix}_{suffix}" in taken for suffix in _PART_SUFFIXES):
        k += 1
        prefix = f"{name}_{k}"
    return prefix


def has_operation(model, predicate, skipped=()):
    """Whether `model` has an operation for which `predicate` holds, not
    named in `skipped` (the names of skipped layers)."""
    return any(predicate(op) and op.name not in skipped for op in graph.Graph(model).operations)
