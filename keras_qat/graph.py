"""The graph of a Keras model: the one module that uses Keras internals.

Keras 3 has no public API for walking a model's graph (which layer feeds
which) or for rebuilding it with other layers, so this module reads Keras'
private node lists (`_inbound_nodes`, `_keras_history`, `_nodes_by_depth`),
runs graphs with `Function._run_through_graph`, and imports the classes of
Keras' tensor operations (`x + y` on symbolic tensors) from `keras.src`.
Nothing else in keras_qat does; when a Keras release changes these
internals, this is the file to change.

The rest of the package sees:

- `functional_graph(model)`: the Functional graph of a Sequential or
  Functional model (a clear error for subclassed models);
- `Graph(model)`: producers, consumers and inputs of every operation, in
  topological order, restricted to that model;
- `rebuild(model, call)`: a new Functional model, built by calling
  `call(operation, *args, **kwargs)` for every node of the old graph;
- small helpers: `node_arguments`, `function_nodes`, `node_constants`, `own_weight_attributes`,
  `consumer_operations`, `arguments_between`, `non_tensor_outputs_recorded`,
  `all_layers`, `pack_inputs`, `clone_lambda`.
"""

import contextlib
import re

import keras
from keras.src.export import export_utils as _export_utils
from keras.src.layers import layer as _layer_module
from keras.src.ops import core as _core_ops
from keras.src.ops import math as _math_ops
from keras.src.ops import nn as _nn_ops
from keras.src.ops import node as _node
from keras.src.ops import numpy as _numpy_ops
from keras.src.ops import operation as _operation_module

# Keras operations that `+`, `-` and `*` on symbolic tensors create (for
# example `x + 3.0` in a Functional model): graph nodes that are not layers.
ADD_OPERATION = _numpy_ops.Add
SUBTRACT_OPERATION = _numpy_ops.Subtract
MULTIPLY_OPERATION = _numpy_ops.Multiply
# The cast some Keras releases put after a model input under mixed precision.
CAST_OPERATION = _core_ops.Cast
# Keras operations of transformer code between layers: `keras.ops.matmul`,
# `mean`, `gelu`, `softmax`, and those that only move or select values
# (`reshape`, `transpose`, `expand_dims`, `squeeze`, `x[:, 0]`).
MATMUL_OPERATION = _numpy_ops.Matmul
MEAN_OPERATION = _numpy_ops.Mean
GELU_OPERATION = _nn_ops.Gelu
SOFTMAX_OPERATION = _nn_ops.Softmax
# Operations whose arguments may hold the batch size in traced code.
RESHAPE_OPERATION = _numpy_ops.Reshape
BROADCAST_TO_OPERATION = _numpy_ops.BroadcastTo
TILE_OPERATION = _numpy_ops.Tile
# `keras.ops.pad` (PAD in TFLite: int8 pads with the zero point, 0.0).
PAD_OPERATION = _numpy_ops.Pad
# Keras operations that Keras layers compute too (`keras.ops.relu(x)` in a
# custom layer's call is a `ReLU` layer): activation name by class.
ACTIVATION_OPERATIONS = {
    _nn_ops.Relu: "relu",
    _nn_ops.Relu6: "relu6",
    _nn_ops.Sigmoid: "sigmoid",
    _numpy_ops.Tanh: "tanh",
    _nn_ops.Silu: "silu",
    _nn_ops.HardSigmoid: "hard_sigmoid",
    _nn_ops.HardSilu: "hard_silu",
}
CONCATENATE_OPERATION = _numpy_ops.Concatenate
MOVING_OPERATIONS = (
    _core_ops.ConvertToTensor,
    _core_ops.Slice,
    _numpy_ops.Reshape,
    _numpy_ops.Transpose,
    _numpy_ops.ExpandDims,
    _numpy_ops.Squeeze,
    _numpy_ops.GetItem,
    _numpy_ops.Repeat,  # RESHAPE, TILE, RESHAPE in TFLite
)
# Keras operations of normalizations (RMSNorm) whose int8 kernels round
# onto a grid of their own: RSQRT, SQRT, DIV.
RSQRT_OPERATION = _math_ops.Rsqrt
SQRT_OPERATION = _numpy_ops.Sqrt
DIVIDE_OPERATION = _numpy_ops.Divide
# Keras operations that tracing records as others (transforms/operation_forms.py).
SQUARE_OPERATION = _numpy_ops.Square
POWER_OPERATION = _numpy_ops.Power
NEGATIVE_OPERATION = _numpy_ops.Negative
RECIPROCAL_OPERATION = _numpy_ops.Reciprocal
MOVEAXIS_OPERATION = _numpy_ops.Moveaxis
SPLIT_OPERATION = _numpy_ops.Split
STACK_OPERATION = _numpy_ops.Stack
EINSUM_OPERATION = _numpy_ops.Einsum
DOT_PRODUCT_ATTENTION_OPERATION = _nn_ops.DotProductAttention
WHERE_OPERATION = _numpy_ops.Where
ZEROS_LIKE_OPERATION = _numpy_ops.ZerosLike


def is_functional(model):
    """Whether `model` is a Functional model (not Sequential, not subclassed)."""
    return isinstance(model, keras.Model) and hasattr(model, "_run_through_graph")


def export_input_signature(model):
    """The `tf.TensorSpec`s of the inputs `model.export` serves `model` with
    (their structure and names)."""
    signature = _export_utils.get_input_signature(model)
    return keras.tree.map_structure(_export_utils.make_tf_tensor_spec, signature)


def functional_graph(model):
    """The Functional graph of a Functional or built Sequential model.

    Raises:
        ValueError: for a subclassed model (it has no graph of layers), or a
            Sequential model without an input shape.
    """
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                f"Model '{model.name}' has no input shape yet. Start it with "
                "keras.Input(shape) or call it on data first."
            )
        return graph
    if is_functional(model):
        return model
    raise ValueError(
        f"Model '{model.name}' of class {model.__class__.__name__} is a "
        "subclassed model, which has no graph of layers that keras_qat could "
        "rewrite. Trace its `call` into a Functional model with the same layers "
        "first: `kq.as_functional(model, keras.Input(shape))` (or a sample batch "
        "instead of the Input)."
    )


def reserve_names(model):
    """Makes Keras' automatic names skip every name in `model`.

    Keras names an operation or layer made without a name from a
    per-process counter (`reshape`, `reshape_1`, ...). A model loaded from a
    file (or built in another process) holds names that this process's
    counter has not counted, so a pass that adds `keras.ops.reshape` could
    name it `reshape` beside the model's own `reshape`, and Keras refuses
    the rebuilt model ("The name 'reshape' is used 2 times"). Each name
    `base` or `base_k` moves the counter of `base` past it.
    """
    for operation in Graph(model).operations + all_layers(model):
        match = re.fullmatch(r"(.+)_(\d+)", operation.name)
        base, index = (match.group(1), int(match.group(2))) if match else (operation.name, 0)
        while index < 100_000 and keras.backend.get_uid(base) <= index:
            pass


def producer(tensor):
    """The operation that produced a symbolic `KerasTensor`, or None."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def producer_arguments(tensor):
    """The positional arguments of the call that produced a symbolic
    `KerasTensor`, or `()`."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return ()
    return history.operation._inbound_nodes[history.node_index].arguments.args


@contextlib.contextmanager
def non_tensor_outputs_recorded():
    """Within it, a symbolic call of a layer that returns values that are
    not tensors (a block returning `(x, None)`) is recorded in the graph
    (Keras refuses it): each such value stands as an unused placeholder
    tensor in the node's outputs, so that they line up with what the call
    returns; the caller still receives the value."""
    saved = {m: m.Node for m in (_layer_module, _operation_module) if getattr(m, "Node", None)}
    for module in saved:
        module.Node = _node_of_any_outputs
    try:
        yield
    finally:
        for module, node_class in saved.items():
            module.Node = node_class


def _node_of_any_outputs(operation, call_args=None, call_kwargs=None, outputs=None):
    recorded = keras.tree.map_structure(
        lambda v: v if isinstance(v, keras.KerasTensor) else keras.KerasTensor(()), outputs
    )
    return _node.Node(operation, call_args, call_kwargs, recorded)


def node_arguments(layer):
    """`(args, kwargs)` of each call of `layer` in the graphs it is part of."""
    return [(node.arguments.args, node.arguments.kwargs) for node in layer._inbound_nodes]


def keras_mask(tensor):
    """The Keras mask a symbolic tensor carries (an `Embedding(mask_zero=True)`
    or `Masking` output's), or None."""
    return getattr(tensor, "_keras_mask", None)


def node_calls(layer):
    """`(args, kwargs, outputs)` of each call of `layer` in the graphs it is
    part of (`outputs`: the call's output tensors, a list)."""
    return [
        (node.arguments.args, node.arguments.kwargs, list(node.output_tensors))
        for node in layer._inbound_nodes
    ]


class NodeView:
    """One call in a graph: its operation and the shapes of its first input
    and first output."""

    def __init__(self, node):
        self.operation = node.operation
        self.arguments = (node.arguments.args, node.arguments.kwargs)
        inputs, outputs = node.input_tensors, node.output_tensors
        self.input_shape = tuple(inputs[0].shape) if inputs else ()
        self.output_shape = tuple(outputs[0].shape) if outputs else ()


def node_constants(node_view):
    """The non-symbolic array arguments (constants) of a call, in order."""
    return [
        value
        for value in keras.tree.flatten(node_view.arguments)
        if not isinstance(value, keras.KerasTensor) and hasattr(value, "shape")
    ]


def function_nodes(function):
    """The calls of a `keras.Function` (or model), inputs excluded, in
    topological order."""
    by_depth = function._nodes_by_depth
    return [
        NodeView(node)
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def own_weight_attributes(layer):
    """`{attribute: value}` for the weights that `layer` holds itself in
    attributes (`self.scale`), not through a sub-layer, and the tensors it
    holds (`self.position_ids`)."""
    inner = {id(w) for sub in layer._flatten_layers(include_self=False) for w in sub.weights}
    own = {id(w) for w in layer.weights if id(w) not in inner}
    return {
        name: value
        for name, value in vars(layer).items()
        if (isinstance(value, keras.Variable) and id(value) in own)
        or (keras.ops.is_tensor(value) and not isinstance(value, keras.KerasTensor))
    }


def consumer_operations(operation):
    """The operations that take an output of `operation`, in every graph."""
    return [node.operation for node in operation._outbound_nodes]


def arguments_between(inputs, outputs):
    """`(operation, value)` for every non-symbolic argument (a constant, a
    variable) of the operations that compute symbolic `outputs` from
    symbolic `inputs`."""
    stop = {id(t) for t in inputs}
    seen, found = set(), []
    pending = [t for t in keras.tree.flatten(outputs) if isinstance(t, keras.KerasTensor)]
    while pending:
        tensor = pending.pop()
        history = getattr(tensor, "_keras_history", None)
        if id(tensor) in stop or id(tensor) in seen or history is None:
            continue
        seen.add(id(tensor))
        node = history.operation._inbound_nodes[history.node_index]
        for value in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
            if isinstance(value, keras.KerasTensor):
                pending.append(value)
            else:
                found.append((history.operation, value))
    return found


def all_layers(model):
    """Every layer of `model`, recursively: nested models' layers and
    sub-layers (such as the `FakeQuant` of a `QuantConcatenate`) included."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def pack_inputs(model, inputs):
    """A flat list of input values in `model.inputs` order, in the structure
    the model was built with (a dict, a list or a single tensor)."""
    return keras.tree.pack_sequence_as(functional_graph(model)._inputs_struct, list(inputs))


def clone_lambda(layer, **overrides):
    """A new `Lambda` layer with `layer`'s function, output shape, mask and
    arguments (its output shape is kept in a private attribute)."""
    config = dict(
        output_shape=layer._output_shape,
        mask=layer.mask,
        arguments=layer.arguments,
        name=layer.name,
        trainable=layer.trainable,
        dtype=layer.dtype_policy,
    )
    config.update(overrides)
    return keras.layers.Lambda(layer.function, **config)


class Graph:
    """Who feeds whom in one model, in topological order.

    Only the nodes of this model count: a layer also used in another model
    has its consumers there too, which do not show here.

    Args:
        model: A Sequential or Functional model.
    """

    def __init__(self, model):
        self.model = functional_graph(model)
        by_depth = self.model._nodes_by_depth
        self.nodes = [
            node
            for depth in sorted(by_depth, reverse=True)
            for node in by_depth[depth]
            if node.operation is not None and not node.is_input
        ]
        self._consumers = {}
        self._inputs = {}
        for node in self.nodes:
            self._inputs.setdefault(id(node.operation), list(node.input_tensors))
            for tensor in node.input_tensors:
                self._consumers.setdefault(id(producer(tensor)), []).append(node.operation)
        self.output_operations = {id(producer(t)) for t in self.model.outputs}

    @property
    def input_layers(self):
        """The model's `InputLayer`s, in input order."""
        return [producer(tensor) for tensor in self.model.inputs]

    @property
    def operations(self):
        """Every operation (layers and Keras operations), inputs excluded,
        in topological order, each once."""
        seen, operations = set(), []
        for node in self.nodes:
            if id(node.operation) not in seen:
                seen.add(id(node.operation))
                operations.append(node.operation)
        return operations

    def input_tensors(self, operation):
        """The symbolic inputs of `operation`'s first call in this model."""
        return self._inputs.get(id(operation), [])

    def producers(self, operation):
        """The operations whose outputs `operation` consumes (first call)."""
        return [producer(tensor) for tensor in self.input_tensors(operation)]

    def consumers(self, operation):
        """The operations that consume `operation`'s outputs, one entry per
        consuming call."""
        return self._consumers.get(id(operation), [])

    def is_output(self, operation):
        """Whether `operation` produces one of the model's outputs."""
        return id(operation) in self.output_operations

    def call_count(self, operation):
        """How many times `operation` is called in this model."""
        return sum(node.operation is operation for node in self.nodes)


def rebuild(model, call, dtype=None):
    """Runs a model's graph on new inputs with `call` at every node.

    Args:
        model: A Sequential or Functional model.
        call: `call(operation, *args, **kwargs)` for each node in
            topological order, with the node's arguments mapped to the new
            tensors; returns the outputs that replace the node's outputs (the
            same structure).
        dtype: The dtype of every new input, or None for `model`'s.

    Returns:
        A new Functional model with inputs like `model`'s (shapes, dtypes,
        names and structure) and the outputs `call` produced.
    """
    graph = functional_graph(model)
    inputs = keras.tree.map_structure(
        lambda x: keras.Input(
            batch_shape=x.shape,
            dtype=dtype or x.dtype,
            sparse=x.sparse,
            name=producer(x).name,
        ),
        graph._inputs_struct,
    )
    outputs = graph._run_through_graph(
        keras.tree.flatten(inputs), operation_fn=lambda op: op, call_fn=call
    )
    return keras.Model(inputs, outputs, name=model.name)


def run_graph(model, inputs, call):
    """Runs the graph of `model` (a model or a `keras.Function`) on `inputs`
    (a flat list of tensors) with `call(operation, *args, **kwargs)` at
    every node; returns its outputs. Used to inline a nested model, or a
    traced layer, into the graph being built."""
    graph = functional_graph(model) if isinstance(model, keras.Model) else model
    return graph._run_through_graph(
        keras.tree.flatten(inputs), operation_fn=lambda op: op, call_fn=call
    )
