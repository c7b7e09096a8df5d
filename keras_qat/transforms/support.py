"""What `convert_quant_network` converts, and the one error listing every
layer it does not.

A layer or Keras operation converts when a table says what its int8 model
does with it: a fusion layer (or a Keras layer that fuses into one), a
decomposition, a Keras layer with a quantized form, or one of
`keras_qat.int8_rules`' tables (rounding, grid-keeping, shared-grid). The
refusal message is built from the same tables.
"""

import keras
import numpy as np

from keras_qat import graph, int8_rules
from keras_qat.layers.quantized import QUANTIZED_FORMS, has_quantized_form
from keras_qat.layers.weight_operand import WeightOperand
from keras_qat.transforms import einsum_dense
from keras_qat.transforms.clones import TRACED_FROM
from keras_qat.transforms.fuse import fusable_classes, unfusable_reason
from keras_qat.transforms.operation_forms import REWRITTEN_OPERATIONS

# Layers rewritten as the graph their int8 model computes, in this order.
DECOMPOSITIONS = (einsum_dense.DECOMPOSITION,)

# Keras layers that placement replaces by a quantized form of their own.
QUANTIZED_KERAS_LAYERS = int8_rules.EMBEDDINGS + (keras.layers.LayerNormalization,)

# Layers that turn an integer model input (uint8 images, ...) into floats.
_INTEGER_CASTS = (keras.layers.Rescaling, keras.layers.Normalization)


def is_float(tensor):
    """Whether a symbolic tensor holds floats (bfloat16 included)."""
    return keras.backend.standardize_dtype(tensor.dtype).startswith(("float", "bfloat"))


def is_integer_cast(operation, graph_view):
    """A Rescaling, Normalization or cast to floats that turns an integer
    tensor (an integer model input, such as uint8 images) into a float one.
    Other operations on integer tensors (an `expand_dims` of an int32
    padding mask) keep them integers: nothing rounds them."""
    inputs = graph_view.input_tensors(operation)
    if not inputs or is_float(inputs[0]):
        return False
    if isinstance(operation, graph.CAST_OPERATION):
        return keras.backend.standardize_dtype(operation.dtype).startswith(("float", "bfloat"))
    return isinstance(operation, _INTEGER_CASTS)


def computes_integers(operation, graph_view):
    """A Keras operation on integer or boolean tensors only (masks built
    from padding masks: `minimum`, `expand_dims`, comparisons), other than
    a cast to floats: TFLite computes it in int32 / bool, nothing rounds."""
    if isinstance(operation, keras.layers.Layer) or is_integer_cast(operation, graph_view):
        return False
    inputs = graph_view.input_tensors(operation)
    return bool(inputs) and not any(is_float(t) for t in inputs)


def float64_constant(operation):
    """Whether a Keras operation has a float64 NumPy constant (`x *
    np.sqrt(d)`), which makes Keras compute it, and what follows, in
    float64: no int8 kernel does."""
    if isinstance(operation, keras.layers.Layer):
        return False
    constants = keras.tree.flatten(graph.node_arguments(operation))
    return any(
        isinstance(c, (np.ndarray, np.floating)) and c.dtype == np.float64 for c in constants
    )


def is_supported(operation, graph_view):
    """Whether placement knows what the int8 model does with `operation`
    (after inlining, decomposition and fusion)."""
    if is_integer_cast(operation, graph_view) or computes_integers(operation, graph_view):
        return True
    if int8_rules.unsupported_reason(operation) is not None or float64_constant(operation):
        return False
    if isinstance(operation, graph.MATMUL_OPERATION):  # of two tensors, not a constant
        return len(graph_view.input_tensors(operation)) == 2
    if not isinstance(operation, keras.layers.Layer):
        return isinstance(
            operation, int8_rules.ROUNDING_OPERATIONS + int8_rules.GRID_KEEPING_OPERATIONS
        )
    if type(operation) in QUANTIZED_KERAS_LAYERS or has_quantized_form(operation):
        return True
    if int8_rules.is_embedding(operation):
        return True
    return isinstance(
        operation,
        int8_rules.ROUNDING_LAYERS
        + int8_rules.GRID_KEEPING_LAYERS
        + int8_rules.SHARED_GRID_LAYERS
        + (keras.layers.InputLayer, WeightOperand),
    )


# Keras layers converted through the graph their `call` builds, like custom
# layers: `MultiHeadAttention` becomes its EinsumDense projections (Dense
# layers after `einsum_dense`) and the operations of its attention
# (`operation_forms`: `dot_product_attention`, einsum, a masked softmax).
TRACED_KERAS_LAYERS = (keras.layers.MultiHeadAttention,)


def needs_tracing(operation):
    """Whether `operation` is a layer that conversion knows only through its
    `call`: one of `TRACED_KERAS_LAYERS`, or a class of neither Keras nor
    keras_qat, nor a subclass of a class that a table lists."""
    if not isinstance(operation, keras.layers.Layer) or isinstance(operation, keras.Model):
        return False
    if isinstance(operation, TRACED_KERAS_LAYERS):
        return True
    if type(operation).__module__.split(".")[0] in ("keras", "keras_qat"):
        return False
    known = (
        QUANTIZED_KERAS_LAYERS
        + fusable_classes()
        + int8_rules.ROUNDING_LAYERS
        + int8_rules.GRID_KEEPING_LAYERS
        + int8_rules.SHARED_GRID_LAYERS
    )
    decomposed = any(d.matches(operation) for d in DECOMPOSITIONS)
    if isinstance(operation, keras.layers.Embedding):
        return not int8_rules.is_embedding(operation)
    return not isinstance(operation, known) and not decomposed


def check_supported(model, skipped):
    """Raises one `ValueError` listing every layer of `model` (not named in
    `skipped`) that cannot be converted, with the reason where one is known."""
    graph_view = graph.Graph(model)
    unsupported = [
        describe(op, graph_view)
        for op in graph_view.operations
        if op.name not in skipped and not is_supported(op, graph_view)
    ]
    if unsupported:
        raise ValueError(
            "`convert_quant_network` cannot quantize these layers of model "
            f"'{model.name}': {', '.join(unsupported)}. Supported: {supported_summary()}. "
            "To keep layers in float, pass them to `skip_layers` (names, classes or a "
            "predicate)."
        )


# Keras operations that tracing turns into the Keras layers computing them.
_LAYER_OPERATIONS = tuple(graph.ACTIVATION_OPERATIONS) + (graph.CONCATENATE_OPERATION,)


def _names(classes):
    return ", ".join(c.__name__ for c in classes)


def supported_summary():
    """What converts, by kind, built from the tables."""
    parts = (
        ("layers that fuse with the BatchNormalization and activation after them", _fusable()),
        ("fusion layers", _names(QUANTIZED_FORMS)),
        ("rewritten as their int8 graph", _names(d.layer_class for d in DECOMPOSITIONS)),
        ("traced into the layers and operations they call", _names(TRACED_KERAS_LAYERS)),
        ("with a quantized form", _names(QUANTIZED_KERAS_LAYERS)),
        ("rounding layers", _names(int8_rules.ROUNDING_LAYERS)),
        ("shared-grid layers", _names(int8_rules.SHARED_GRID_LAYERS)),
        ("grid-keeping layers", _names(int8_rules.GRID_KEEPING_LAYERS)),
        ("rounding Keras operations", _names(int8_rules.ROUNDING_OPERATIONS)),
        ("grid-keeping Keras operations", _names(int8_rules.GRID_KEEPING_OPERATIONS)),
        ("Keras operations converted as their layers", _names(_LAYER_OPERATIONS)),
        (
            "Keras operations recorded as the int8 operations that compute them",
            _names(REWRITTEN_OPERATIONS) + ", a Softmax layer called with a mask",
        ),
    )
    return "; ".join(f"{kind}: {names}" for kind, names in parts)


def _fusable():
    """The fusable Keras classes; the affine ones only on 4D inputs."""
    affine = (keras.layers.BatchNormalization, keras.layers.Rescaling, keras.layers.Normalization)
    linear = [c for c in fusable_classes() if c not in affine]
    return f"{_names(linear)} (and {_names(affine)} on 4D inputs, last axis)"


def describe(operation, graph_view):
    """`'name' (Class)`, with the reason when a known attribute is the problem."""
    reason = unfusable_reason(operation) if isinstance(operation, fusable_classes()) else None
    reason = reason or int8_rules.unsupported_reason(operation)
    for decomposition in DECOMPOSITIONS:
        if decomposition.matches(operation):
            reason = decomposition.unsupported_reason(operation)
    if float64_constant(operation):
        reason = (
            "a float64 NumPy constant, which makes Keras compute in float64; use a "
            "Python float or a float32 array"
        )
    elif isinstance(operation, graph.MATMUL_OPERATION):
        reason = "a matmul with a constant; use a Dense or EinsumDense layer"
    reason = f": {reason}" if reason else ""
    kind = "" if isinstance(operation, keras.layers.Layer) else "Keras operation "
    origin = getattr(operation, TRACED_FROM, None)
    inside = f", in the call of {origin}" if origin else ""
    return f"'{operation.name}' ({kind}{operation.__class__.__name__}{reason}{inside})"
