"""A traced graph made free of the batch size it was traced at.

Layer code often reads the batch size (`ops.shape(x)[0]`: to reshape, to
tile a class token to the batch, to broadcast a position table to the
input's shape), which a symbolic graph does not know. Tracing
(`keras_qat.transforms.tracing`) therefore runs a layer's `call` twice, on
inputs of two batch sizes, and this module compares the two graphs: where
they differ, the value depends on the batch size, and is rewritten so that
the graph runs at any batch size:

- a `reshape` whose target differs: the dimension that differs becomes -1
  (the others are the traced ones);
- a `broadcast_to` or `tile` over the batch axis of a tensor with one row
  (or without a batch axis): a `BatchBroadcast` to the batch of the layer's
  first input (BROADCAST_TO in TFLite, which keeps the int8 grid).

- a constant with one row per example, all equal (`ops.ones((batch, 1,
  1))`): its first row, which broadcasts like the whole.

Anything else that differs is refused, naming the operation; so is a size
that is unknown when traced (a slice to a sequence length the inputs leave
open), with the way to fix the inputs' size.
"""

import keras
import numpy as np

from keras_qat import graph
from keras_qat.layers.batch_broadcast import BatchBroadcast

# The two batch sizes a layer is traced at.
TRACE_BATCH_SIZES = (3, 5)


class BatchSizeError(ValueError):
    """An operation whose arguments depend on the batch size in a way
    that cannot be rewritten."""


def batch_free(traced, other, inputs):
    """Runs graph `traced` on `inputs` (any batch size) with its
    batch-dependent operations rewritten, comparing it with `other`, the
    same call traced at another batch size.

    Args:
        traced, other: `keras.Function`s of the same call at the two batch
            sizes of `TRACE_BATCH_SIZES`.
        inputs: Symbolic tensors with the batch axis unknown, like
            `traced.inputs`.

    Returns:
        The outputs, computed on `inputs`.

    Raises:
        BatchSizeError: for a difference that cannot be rewritten.
    """
    nodes, other_nodes = graph.function_nodes(traced), graph.function_nodes(other)
    kinds = [type(n.operation) for n in nodes]
    if kinds != [type(n.operation) for n in other_nodes]:
        raise BatchSizeError("its `call` records different operations at different batch sizes")
    rewrites, constants = {}, {}
    for node, other_node in zip(nodes, other_nodes):
        rewrite = _rewrite(node, other_node)
        if rewrite is not None:
            rewrites[id(node.operation)] = rewrite
        constants.update(_batch_free_constants(node, other_node))
    anchor = inputs[0]

    def call(operation, *args, **kwargs):
        args, kwargs = keras.tree.map_structure(
            lambda value: constants.get(id(value), value), (args, kwargs)
        )
        if id(operation) in rewrites:
            return rewrites[id(operation)](anchor, *args, **kwargs)
        return operation(*args, **kwargs)

    return graph.run_graph(traced, inputs, call)


def _config(operation):
    config = dict(operation.get_config())
    config.pop("name", None)
    return config


def _rewrite(node, other_node):
    """`(anchor, *args, **kwargs) -> outputs` for a batch-dependent
    operation, or None for one that does not depend on the batch size."""
    operation = node.operation
    if isinstance(operation, keras.layers.Layer):
        return None  # a layer computes the same at any batch size
    _check_known_sizes(operation)
    if _config(operation) == _config(other_node.operation):
        return None
    shape, other_shape = node.output_shape, other_node.output_shape
    varying = [axis for axis, (a, b) in enumerate(zip(shape, other_shape)) if a != b]
    if isinstance(operation, graph.RESHAPE_OPERATION) and len(varying) == 1:
        newshape = tuple(-1 if axis in varying else d for axis, d in enumerate(shape))
        return lambda anchor, x: keras.ops.reshape(x, newshape)
    broadcasts = isinstance(operation, (graph.BROADCAST_TO_OPERATION, graph.TILE_OPERATION))
    missing = len(shape) - len(node.input_shape)
    expanded = (1,) * missing + tuple(node.input_shape)
    if broadcasts and varying == [0] and expanded[0] == 1 and expanded[1:] == tuple(shape[1:]):
        return lambda anchor, x, *rest: BatchBroadcast(name=operation.name)(
            [_with_rank(x, missing), anchor]
        )
    raise BatchSizeError(
        f"{operation.__class__.__name__} '{operation.name}' takes arguments that depend "
        f"on the batch size ({_config(operation)} at batch size {TRACE_BATCH_SIZES[0]}), "
        "which a graph for any batch size cannot hold"
    )


def _with_rank(x, missing):
    """`x` with `missing` leading axes of size 1."""
    for _ in range(missing):
        x = keras.ops.expand_dims(x, 0)
    return x


def _check_known_sizes(operation):
    """Raises `BatchSizeError` for an operation whose sizes are unknown at
    trace time (a slice to a sequence length that the inputs leave open)."""
    sizes = [v for v in _config(operation).values() if isinstance(v, (list, tuple))]
    if any(d is None for size in sizes for d in keras.tree.flatten(size)):
        raise BatchSizeError(
            f"{operation.__class__.__name__} '{operation.name}' takes a size that is unknown "
            f"when traced ({_config(operation)}): an input dimension other than the batch "
            "(a sequence length) is None. Convert a model whose inputs have that size "
            "fixed: `inputs = {name: keras.Input((length,), dtype=...) for ...}; "
            "keras.Model(inputs, backbone(inputs))`"
        )


def _batch_free_constants(node, other_node):
    """`{id(constant): replacement}` for the constants of a call that depend
    on the batch size: a constant whose rows along the batch axis are all
    equal (`ops.ones((batch, 1, 1))`) becomes its first row, which
    broadcasts like the whole; any other difference is refused."""
    replacements = {}
    pairs = zip(graph.node_constants(node), graph.node_constants(other_node))
    for value, other in pairs:
        value_array, other_array = np.asarray(value), np.asarray(other)
        if value_array.shape == other_array.shape:
            continue
        first = value_array[:1]
        same_rows = value_array.shape[1:] == other_array.shape[1:] and (
            np.all(value_array == first) and np.all(other_array == other_array[:1])
        )
        if not same_rows or value_array.shape[0] != TRACE_BATCH_SIZES[0]:
            raise BatchSizeError(
                f"{node.operation.__class__.__name__} '{node.operation.name}' takes a constant "
                f"whose shape depends on the batch size ({value_array.shape} at batch size "
                f"{TRACE_BATCH_SIZES[0]}) and whose rows differ"
            )
        replacements[id(value)] = first
    return replacements
