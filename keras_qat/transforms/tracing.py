"""Layers that conversion does not know, replaced by the graph their `call`
builds.

A custom layer (a keras-hub `TransformerEncoder`, a residual block written
as a `Layer` subclass) is a graph of its sub-layers and Keras operations
run by Python code. Calling its `call` on symbolic tensors records that
graph: the sub-layers' calls and the operations between them become nodes,
as in any Functional model, and placement treats them like any others.
Tracing repeats until no unknown layer is left (a block made of blocks).

Keras operations that a Keras layer computes too (`keras.ops.relu`,
`sigmoid`, `silu`, `concatenate`, ...) become that layer, so that fusion and
placement see a `ReLU` after a BatchNorm as they do in a Functional model;
others are recorded as the operations TFLite's int8 kernels compute
(`square` as a product, `einsum` as a matmul:
`keras_qat.transforms.operation_forms`).

The traced model computes what the layer computes, with copies of its
sub-layers' weights, their `trainable` flags and dtype policies. Three
things cannot be traced, and conversion names the layer and the reason:

- a `call` that fails on symbolic tensors (Python code that needs values,
  such as a batch size read with `ops.shape(x)[0]`);
- a trainable weight used directly in an operation (`x + self.table`):
  the graph would hold it as a constant, and training would not move it;
- a tensor computed from trainable weights outside the graph (a sub-layer
  called on a weight, such as `self.embedding(self.position_ids)`), for the
  same reason.

Non-trainable weights and other constants that `call` uses become NumPy
constants of the graph.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from keras_qat import graph
from keras_qat.layers.weight_operand import WeightOperand
from keras_qat.transforms import symbolic_calls
from keras_qat.transforms.batch_size import TRACE_BATCH_SIZES, BatchSizeError, batch_free
from keras_qat.transforms.clones import TRACED_FROM, Clones, UniqueNames, clone
from keras_qat.transforms.operation_forms import quantizable_form

# How deep blocks nest before tracing gives up (a layer that calls itself).
_MAX_DEPTH = 32


class UntraceableLayerError(ValueError):
    """A layer whose `call` cannot be recorded as a graph (the reason says
    why)."""

    def __init__(self, layer, reason):
        self.layer = layer
        self.reason = reason
        super().__init__(f"'{layer.name}' ({layer.__class__.__name__}): {reason}")


def trace_layers(model, needs_tracing):
    """Returns `model` with every layer for which `needs_tracing(layer)`
    holds replaced by the graph its `call` builds, recursively.

    Args:
        model: A flat Functional model (nested models inlined).
        needs_tracing: `layer -> bool`, whether a layer is unknown to
            conversion (and not kept in float).

    Returns:
        `model` itself when no layer needs tracing, else a new Functional
        model with copies of the weights. The layers of a traced layer keep
        their names unless taken: then `<traced layer>_<name>`.

    Raises:
        ValueError: listing every layer that cannot be traced, with the
            reason and what to do.
    """
    operations = graph.Graph(model).operations
    if not any(needs_tracing(op) or quantizable_form(op, op.name) for op in operations):
        return model
    clones, names, errors = Clones(), UniqueNames(model), []

    def call_in(prefix, depth, traced_layer=None):
        # The parts of an attention layer are named after it (`mha_query`).
        part = isinstance(traced_layer, keras.layers.MultiHeadAttention)

        def call(operation, *args, **kwargs):
            args, kwargs = keras.tree.map_structure(_as_constant, (args, kwargs))
            name = names.name_for(operation, prefix, part)
            as_layer = quantizable_form(operation, name)
            if as_layer is not None:
                return as_layer(*args, **kwargs)
            if not needs_tracing(operation):
                copy = _copy(operation, clones, name)
                return _call_copy(copy, operation, traced_layer, args, kwargs)
            if depth == _MAX_DEPTH:
                raise ValueError(
                    f"Layer '{operation.name}' nests layers more than {_MAX_DEPTH} levels "
                    "deep (or calls itself); it cannot be traced."
                )
            try:
                _check_no_keras_masks(operation)
                block = trace_call(operation, args, kwargs)
            except UntraceableLayerError as error:
                errors.append(str(error))
                return operation(*args, **kwargs)
            inputs = [t for t in keras.tree.flatten((args, kwargs)) if _is_symbolic(t)]
            inner = call_in(names.name_for(operation, prefix, part), depth + 1, operation)
            tensors = graph.run_graph(block.function, inputs, inner)
            return block.outputs_from(tensors)

        return call

    traced = _rebuild(model, call_in(model.name, 0), errors)
    clones.copy_weights()
    return traced


def _check_no_keras_masks(layer):
    """Raises `UntraceableLayerError` for a layer called on tensors that
    carry Keras masks: its `call` reads them from its inputs (a
    `MultiHeadAttention` its `query_mask` / `value_mask`), which the traced
    graph's placeholders do not have."""
    for args, kwargs in graph.node_arguments(layer):
        tensors = [t for t in keras.tree.flatten((args, kwargs)) if _is_symbolic(t)]
        if any(graph.keras_mask(t) is not None for t in tensors):
            raise UntraceableLayerError(
                layer,
                "called on inputs that carry Keras masks (of an Embedding(mask_zero=True) or "
                "Masking layer), which its traced graph would lose; pass masks as arguments "
                "(an attention_mask, a padding mask) instead",
            )


def _rebuild(model, call, errors):
    """`graph.rebuild(model, call)`, or one error listing `errors` (the
    layers that could not be traced, appended while rebuilding) when there
    are any. An untraced layer called in each of several traced blocks has
    its name more than once, which rebuilding refuses: the tracing errors
    are the cause then."""
    try:
        with symbolic_calls.einsum_dense_shapes_inferred():
            traced = graph.rebuild(model, call)
    except ValueError:
        if not errors:
            raise
    if errors:
        raise ValueError(
            f"`convert_quant_network` cannot trace these layers of model '{model.name}' "
            f"into layers and operations it quantizes: {'; '.join(errors)}. Keep them in "
            "float with `skip_layers` (names, classes or a predicate)."
        )
    return traced


def _call_copy(copy, operation, traced_layer, args, kwargs):
    """Calls `copy` of `operation` as the traced layer `traced_layer` (None:
    the model itself) called it, and records that layer in it for error
    messages. A cached attention is called without its cache."""
    if traced_layer is not None:
        origin = f"'{traced_layer.name}' ({type(traced_layer).__name__})"
        setattr(copy, TRACED_FROM, origin)
    if symbolic_calls.is_cached_attention(operation):
        kwargs = {k: v for k, v in kwargs.items() if k not in symbolic_calls.CACHE_ARGUMENTS}
    return copy(*args, **kwargs)


def _copy(operation, clones, name):
    """The copy of a layer (or Keras operation) in the traced model: a
    cached attention as a plain `MultiHeadAttention`."""
    if symbolic_calls.is_cached_attention(operation):
        return clones.of(operation, lambda: symbolic_calls.plain_attention(operation, name))
    return clones.of(operation, lambda: clone(operation, name=name))


def as_functional(model, inputs):
    """A Functional model that computes what a subclassed model computes.

    The model's `call` is run on symbolic inputs, as `convert_quant_network`
    traces a custom layer; the result shares the model's layers (and so its
    weights), and converts like any Functional model.

    Args:
        model: A `keras.Model` subclass with its own `call`.
        inputs: What `call` takes: a `keras.Input`, a sample batch (a NumPy
            array; its first axis is the batch, which becomes `None`), or a
            list or dict of them.

    Returns:
        A Functional model named like `model`.

    Raises:
        ValueError: for an input that is neither a `keras.Input` nor an
            array, or a `call` that cannot be traced (with the reason).

    Example:

    >>> class Net(keras.Model):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.hidden = keras.layers.Dense(8, activation="relu")
    ...         self.logits = keras.layers.Dense(2)
    ...     def call(self, x):
    ...         return self.logits(self.hidden(x))
    >>> functional = as_functional(Net(), keras.Input((4,)))
    >>> [type(layer).__name__ for layer in functional.layers]
    ['InputLayer', 'Dense', 'Dense']
    """
    symbolic = keras.tree.map_structure(_input_like, inputs)
    if not model.built:
        model(symbolic)  # creates the weights
    with symbolic_calls.einsum_dense_shapes_inferred():
        traced = trace_call(model, (symbolic,), {})
    inputs = keras.tree.pack_sequence_as(symbolic, traced.function.inputs)
    return keras.Model(inputs, traced.outputs_from(traced.function.outputs), name=model.name)


def _input_like(value):
    if isinstance(value, keras.KerasTensor):
        return value
    if isinstance(value, (np.ndarray, tf.Tensor)) and len(value.shape) >= 1:
        dtype = keras.backend.standardize_dtype(value.dtype)
        return keras.Input(shape=tuple(value.shape[1:]), dtype=dtype)
    raise ValueError(
        "Received an invalid value for `inputs`: expected `keras.Input`s or sample batches "
        f"(arrays with a batch axis), or a list or dict of them. Received: {value!r}"
    )


def _is_symbolic(value):
    return isinstance(value, keras.KerasTensor)


class TracedCall:
    """A layer's call recorded as a graph.

    Attributes:
        function: A `keras.Function` from the symbolic tensors of the call's
            arguments, flattened, to the symbolic tensors it returns, as a
            list.
        outputs: What the call returns, with `_TENSOR` for each of those
            tensors and other values (None, constants) as they are.
    """

    def __init__(self, function, outputs):
        self.function = function
        self.outputs = outputs

    def outputs_from(self, tensors):
        """The call's outputs, with `tensors` (the function's outputs on
        other inputs) in place of its symbolic tensors."""
        tensors = iter(tensors)
        return keras.tree.map_structure(
            lambda v: next(tensors) if v is _TENSOR else v, self.outputs
        )


# Stands for a symbolic output of a traced call in `TracedCall.outputs`.
_TENSOR = "<traced tensor>"


def trace_call(layer, args, kwargs):
    """Calls `layer.call` on new symbolic inputs like `args` and `kwargs`
    and checks the graph it records.

    The call is traced at two batch sizes and the graphs compared, so that
    code reading the batch size gives a graph for any batch size
    (`keras_qat.transforms.batch_size`).

    Returns:
        A `TracedCall`.

    Raises:
        UntraceableLayerError: when `call` fails on symbolic tensors, or the
            graph uses trainable weights outside it, or depends on the batch
            size in a way no graph for any batch size can hold.
    """
    with (
        symbolic_calls.symbolic_cached_attention(layer),
        symbolic_calls.specs_from_custom_calls(layer),
        graph.non_tensor_outputs_recorded(),
    ):
        (traced, outputs), (other, other_outputs) = (
            _trace_at(layer, args, kwargs, size) for size in TRACE_BATCH_SIZES
        )
        inputs = [_placeholder(t) for t in keras.tree.flatten((args, kwargs)) if _is_symbolic(t)]
        try:
            tensors = batch_free(traced, other, inputs)
        except BatchSizeError as error:
            raise UntraceableLayerError(layer, str(error)) from error
    structure = _output_structure(layer, outputs, other_outputs)
    return TracedCall(keras.Function(inputs, tensors, name=layer.name), structure)


def _output_structure(layer, outputs, other_outputs):
    """The call's outputs with `_TENSOR` for symbolic tensors; values that
    are not tensors must be equal at both batch sizes."""
    structure = keras.tree.map_structure(lambda v: _TENSOR if _is_symbolic(v) else v, outputs)
    for value, other in zip(keras.tree.flatten(outputs), keras.tree.flatten(other_outputs)):
        if not _is_symbolic(value) and not _same_value(value, other):
            raise UntraceableLayerError(
                layer, "its `call` returns a value that depends on the batch size"
            )
    return structure


def _same_value(value, other):
    if value is None or other is None:
        return value is other
    value, other = np.asarray(value), np.asarray(other)
    return value.shape == other.shape and np.array_equal(value, other)


def _trace_at(layer, args, kwargs, batch_size):
    """`layer.call` traced on inputs of batch size `batch_size`: a
    `keras.Function` from the symbolic tensors of `(args, kwargs)` to the
    symbolic tensors the call returns, and what it returns."""
    args, kwargs = keras.tree.map_structure(
        lambda value: _placeholder(value, batch_size), (args, kwargs)
    )
    inputs = [t for t in keras.tree.flatten((args, kwargs)) if _is_symbolic(t)]
    watched = [v.value for v in layer.trainable_variables]
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(watched)
        with _weights_as_operands(layer, inputs[0]):
            try:
                outputs = layer.call(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any failure is reported with the layer
                raise _call_failure(layer, error, inputs) from error
    tensors = [t for t in keras.tree.flatten(outputs) if _is_symbolic(t)]
    for operation, constant in _constants(tensors, inputs):
        _check_constant(layer, operation, constant, tape, watched)
    try:
        return keras.Function(inputs, tensors, name=layer.name), outputs
    except ValueError as error:  # an input that no output depends on
        raise UntraceableLayerError(
            layer,
            "its `call` leaves some of its tensor arguments unused (its `__call__` passes "
            "them on in another way, as Keras 3.10's MultiHeadAttention takes `query_mask` "
            f"as its query's Keras mask): {_first_line(error)}",
        ) from error


def _call_failure(layer, error, inputs):
    """The `UntraceableLayerError` for a `call` that raised `error` on
    symbolic `inputs`; with the fix when one of their sizes besides the
    batch is unknown (code that reads it, such as a causal mask's)."""
    reason = f"its `call` fails on symbolic tensors ({type(error).__name__}: {_first_line(error)})"
    if any(None in tuple(t.shape[1:]) for t in inputs):
        reason += (
            "; an input dimension other than the batch is None: convert a model whose "
            "inputs have that size fixed (`keras.Input((length, ...))`)"
        )
    return UntraceableLayerError(layer, reason)


@contextlib.contextmanager
def _weights_as_operands(layer, anchor):
    """While `layer.call` is traced, each of its own weights held in an
    attribute (`self.scale`, not a sub-layer's), and each tensor it holds
    (`self.position_ids`), is the output of a `WeightOperand` holding a
    copy, placed in the graph by `anchor`."""
    swapped = {}
    for name, variable in graph.own_weight_attributes(layer).items():
        trainable = getattr(variable, "trainable", False) and layer.trainable
        operand = WeightOperand(
            variable.shape,
            weight_dtype=keras.backend.standardize_dtype(variable.dtype),
            trainable=trainable,
            dtype=layer.dtype_policy,
            name=f"{layer.name}_{name.strip('_')}",
        )
        tensor = operand(anchor)
        operand.value.assign(variable)
        swapped[name] = variable
        object.__setattr__(layer, name, tensor)
    try:
        yield
    finally:
        for name, variable in swapped.items():
            object.__setattr__(layer, name, variable)


def _placeholder(value, batch_size=None):
    """A new `keras.Input` like a symbolic tensor, with an unknown batch
    axis given `batch_size` (other values as they are)."""
    if not _is_symbolic(value):
        return value
    shape = tuple(value.shape)
    if batch_size is not None and shape and shape[0] is None:
        shape = (batch_size,) + shape[1:]
    # Sparse only for a sparse model input: Keras marks `dense * constant`
    # as sparse (keras-hub's Gemma scales its embeddings so), and a sparse
    # placeholder fails dense code.
    sparse = value.sparse and isinstance(graph.producer(value), keras.layers.InputLayer)
    return keras.Input(batch_shape=shape, dtype=value.dtype, sparse=sparse)


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else "no message"


def _constants(outputs, inputs):
    """`(operation, value)` for every non-symbolic tensor or variable that an
    operation between `inputs` and `outputs` takes."""
    return [
        (operation, value)
        for operation, value in graph.arguments_between(inputs, outputs)
        if isinstance(value, (keras.Variable, tf.Tensor, tf.Variable))
    ]


def _check_constant(layer, operation, value, tape, watched):
    if isinstance(value, keras.Variable):
        if value.trainable:
            raise UntraceableLayerError(
                layer,
                f"{operation.__class__.__name__} '{operation.name}' uses its trainable weight "
                f"'{value.path}' directly, which a traced graph would hold as a constant",
            )
        return
    if watched and any(g is not None for g in tape.gradient(value, watched)):
        raise UntraceableLayerError(
            layer,
            f"{operation.__class__.__name__} '{operation.name}' takes a tensor computed "
            "from trainable weights outside the graph (a sub-layer called on a weight), "
            "which a traced graph would hold as a constant",
        )


def _as_constant(value):
    """A variable or eager tensor of a traced call as a NumPy constant."""
    if isinstance(value, (keras.Variable, tf.Tensor, tf.Variable)):
        return np.asarray(keras.ops.convert_to_numpy(value))
    return value
