"""Rewrites of the QDQ ONNX graph that `tf2onnx` makes of an int8 TFLite model.

`tf2onnx.convert.from_tflite` turns each int8 TFLite op into
DequantizeLinear -> float op -> QuantizeLinear, with int8 weights and
int32 biases as initializers (per-axis scales where TFLite has them).
What it leaves is rewritten here, in place on the `onnx.ModelProto`:

- `name_inputs_and_outputs`: the graph's inputs and outputs take the Keras
  model's names (the TFLite signature's), outputs in Keras' flat order.
- `decompose_gelu`: TFLite's GELU has no tf2onnx handler (it stays a
  `TFL_GELU` node); it becomes the ONNX ops that compute it.
- `requantize_data_movement`: tf2onnx moves int8 tensors through Reshape,
  Transpose and Squeeze as integers (QuantizeLinear -> Reshape ->
  DequantizeLinear). Values are the same, but ONNX Runtime's QDQ fusion
  then misses the op after them and runs it in float (measured: 4 of 5
  convolutions of LeNet-5); each such op is given the QDQ form
  DequantizeLinear -> op -> QuantizeLinear, which ONNX Runtime runs on
  integers.
- `activations_as_uint8`: int8 activations become uint8 with the zero point
  moved by 128, the same real values (q + 128 at zero point z + 128). ONNX
  Runtime's x86 kernels take uint8 activations; it converts int8 ones
  itself only where a QuantizeLinear has one consumer and fell back to
  float convolutions in a residual network (6 of 10) before this rewrite.
- `weights_as_uint8`: with uint8 activations, int8 weights and constants
  become uint8 the same way. ONNX Runtime's x86 kernels for uint8
  activations with int8 weights sum pairs of products in 16 bits with
  saturation on CPUs without VNNI (AVX2, AVX-512 without VNNI): measured on
  an AVX2 machine, a small CNN 6 output steps off and an encoder block 90;
  with uint8 weights its kernels widen to 16 bits first and both are exact
  (within one step).

`unsupported_ops` and `float_compute_ops` are the checks `export_onnx`
refuses on.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
# Ops whose int8 output holds its int8 input's values, moved or selected.
_DATA_MOVEMENT = {
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Identity",
    "Slice",
    "Gather",
    "Concat",
    "Split",
    "MaxPool",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "Tile",
    "Expand",
}
# Ops that multiply-accumulate: each must take dequantized operands.
_COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def _tensor_names(graph):
    names = {init.name for init in graph.initializer}
    names.update(value.name for value in list(graph.input) + list(graph.output))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _rename(graph, old, new):
    """Renames tensor `old` to `new` everywhere; a tensor already named
    `new` is first renamed out of the way."""
    if old == new:
        return
    names = _tensor_names(graph)
    if new in names:
        moved = f"{new}/internal"
        while moved in names:
            moved += "_"
        _rename(graph, new, moved)
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.initializer):
        if value.name == old:
            value.name = new


def _keras_name(onnx_name, names):
    """The Keras name of ONNX tensor `onnx_name` in `{TFLite tensor name:
    Keras name}` (tf2onnx may add ":0"), or None."""
    for tensor, keras_name in names.items():
        if onnx_name in (tensor, f"{tensor}:0"):
            return keras_name
    return None


def name_inputs_and_outputs(model, input_names, output_names):
    """Renames graph inputs and outputs by `{TFLite tensor name: Keras
    name}` and orders the outputs as `output_names` (a dict in Keras'
    order). An output named like an input (ONNX names each tensor once)
    takes the suffix `_output`."""
    graph = model.graph
    inputs = set()
    for value in graph.input:
        name = _keras_name(value.name, input_names)
        if name is not None:
            _rename(graph, value.name, name)
            inputs.add(name)
    order = {}
    for value in graph.output:
        name = _keras_name(value.name, output_names)
        if name is None:
            continue
        position = list(output_names.values()).index(name)
        while name in inputs:
            name += "_output"
        _rename(graph, value.name, name)
        order[name] = position
    ordered = sorted(graph.output, key=lambda value: order.get(value.name, len(order)))
    del graph.output[:]
    graph.output.extend(ordered)


def _constant(graph, name, value):
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name


def decompose_gelu(model):
    """Each `TFL_GELU` node becomes 0.5 x (1 + erf(x / sqrt 2)), or the tanh
    form when its `approximate` attribute is set, as TFLite defines them."""
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "TFL_GELU":
            nodes.append(node)
            continue
        approximate = any(a.name == "approximate" and a.i for a in node.attribute)
        nodes.extend(_gelu_nodes(graph, node.name, node.input[0], node.output[0], approximate))
    del graph.node[:]
    graph.node.extend(nodes)


def _gelu_nodes(graph, name, x, y, approximate):
    def t(suffix):
        return f"{name}/{suffix}"

    half = _constant(graph, t("half"), 0.5)
    one = _constant(graph, t("one"), 1.0)
    if approximate:
        cubic = _constant(graph, t("cubic"), 0.044715)
        scale = _constant(graph, t("scale"), np.sqrt(2.0 / np.pi))
        inner = [
            helper.make_node("Mul", [x, x], [t("x2")], name=t("x2")),
            helper.make_node("Mul", [t("x2"), x], [t("x3")], name=t("x3")),
            helper.make_node("Mul", [t("x3"), cubic], [t("cx3")], name=t("cx3")),
            helper.make_node("Add", [x, t("cx3")], [t("sum")], name=t("sum")),
            helper.make_node("Mul", [t("sum"), scale], [t("arg")], name=t("arg")),
            helper.make_node("Tanh", [t("arg")], [t("curve")], name=t("curve")),
        ]
    else:
        root = _constant(graph, t("inv_sqrt2"), 1.0 / np.sqrt(2.0))
        inner = [
            helper.make_node("Mul", [x, root], [t("arg")], name=t("arg")),
            helper.make_node("Erf", [t("arg")], [t("curve")], name=t("curve")),
        ]
    return inner + [
        helper.make_node("Add", [t("curve"), one], [t("one_plus")], name=t("one_plus")),
        helper.make_node("Mul", [x, half], [t("half_x")], name=t("half_x")),
        helper.make_node("Mul", [t("half_x"), t("one_plus")], [y], name=t("product")),
    ]


def _values(model):
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def requantize_data_movement(model):
    """Each op that moves a quantized integer tensor (see the module's
    docstring) computes on its dequantized values between a
    DequantizeLinear and a QuantizeLinear of the same scale and zero point.
    Its other integer operands (an int8 constant concatenated to it, a row
    gathered from an int8 table) are dequantized with that quantization,
    the one TFLite gives all operands of such an op. Raises if the
    quantized inputs of one such op have different quantizations."""
    graph, values = model.graph, _values(model)
    quantization = {}  # integer tensor from a QuantizeLinear -> (scale, zero point) names
    constants = {name for name, value in values.items() if value.dtype in (np.int8, np.uint8)}
    nodes = []
    for node in graph.node:
        if node.op_type == QUANTIZE:
            quantization[node.output[0]] = tuple(node.input[1:3])
        quantized = [name for name in node.input if name in quantization]
        if node.op_type not in _DATA_MOVEMENT or not quantized:
            if node.op_type in _DATA_MOVEMENT and node.input and node.input[0] in constants:
                constants.update(node.output)  # a slice or gather of an int8 table
            nodes.append(node)
            continue
        shared = quantization[quantized[0]]
        for other in quantized[1:]:
            if not _same(values, quantization[other], shared):
                raise ValueError(
                    f"ONNX export: '{node.name}' ({node.op_type}) moves integer tensors of "
                    "different quantizations, which it cannot be given one QDQ form for."
                )
        nodes.extend(_dequantized_operands(node, quantization, constants, shared))
        nodes.append(node)
        for position, name in enumerate(list(node.output)):
            node.output[position] = f"{name}/float"
            nodes.append(
                helper.make_node(
                    QUANTIZE, [f"{name}/float", *shared], [name], name=f"{name}/quantize"
                )
            )
            quantization[name] = shared
    del graph.node[:]
    graph.node.extend(nodes)


def _dequantized_operands(node, quantization, constants, shared):
    """DequantizeLinear nodes for `node`'s integer operands, which it then
    reads instead (one per operand position)."""
    added = []
    for position, name in enumerate(node.input):
        if name not in quantization and name not in constants:
            continue
        dequantized = f"{node.name}/dequantized/{position}"
        parameters = quantization.get(name, shared)
        added.append(
            helper.make_node(DEQUANTIZE, [name, *parameters], [dequantized], name=dequantized)
        )
        node.input[position] = dequantized
    return added


def _same(values, a, b):
    return all(np.array_equal(values[x], values[y]) for x, y in zip(a, b))


def activations_as_uint8(model):
    """int8 activations (the output of a QuantizeLinear that only
    DequantizeLinear nodes read, and those) become uint8 at the zero point
    + 128; int8 weights and tables stay int8."""
    graph, values = model.graph, _values(model)
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    outputs = {value.name for value in graph.output}
    uint8_zero_points = {}
    quantized = set()

    def shifted(name):
        if name not in uint8_zero_points:
            zero_point = values[name].astype(np.int16) + 128
            new = f"{name}/uint8"
            graph.initializer.append(numpy_helper.from_array(zero_point.astype(np.uint8), new))
            uint8_zero_points[name] = new
        return uint8_zero_points[name]

    for node in graph.node:
        if len(node.input) < 3 or values.get(node.input[2], np.zeros(0, np.uint8)).dtype != np.int8:
            continue
        if node.op_type == QUANTIZE:
            if readers.get(node.output[0]) != {DEQUANTIZE} or node.output[0] in outputs:
                continue
            quantized.add(node.output[0])
            node.input[2] = shifted(node.input[2])
        elif node.op_type == DEQUANTIZE and node.input[0] in quantized:
            node.input[2] = shifted(node.input[2])


def weights_as_uint8(model):
    """int8 initializers that a DequantizeLinear reads (weights, constant
    operands) become uint8 at the zero point + 128: the same real values."""
    graph, values = model.graph, _values(model)
    for node in graph.node:
        if node.op_type != DEQUANTIZE or len(node.input) < 3:
            continue
        weights, zero_point = node.input[0], node.input[2]
        if weights not in values or values[weights].dtype != np.int8:
            continue
        for index, name in ((0, weights), (2, zero_point)):
            new = f"{name}/uint8"
            if new not in values:
                values[new] = (values[name].astype(np.int16) + 128).astype(np.uint8)
                graph.initializer.append(numpy_helper.from_array(values[new], new))
            node.input[index] = new


def remove_unused_initializers(model):
    """Drops initializers no node reads (the int8 zero points that
    `activations_as_uint8` replaced), which ONNX Runtime warns about."""
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def unsupported_ops(model):
    """`["name (op)"]` of the nodes that are no ONNX operator of the model's
    opset (TFLite ops tf2onnx has no handler for: it keeps them as
    `TFL_<op>` nodes)."""
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    left = []
    for node in model.graph.node:
        version = opsets.get(node.domain or "", 0)
        try:
            onnx.defs.get_schema(node.op_type, version, node.domain or "")
        except onnx.defs.SchemaError:
            left.append(f"{node.name} ({node.op_type})")
    return left


def float_compute_ops(model):
    """`["name (op)"]` of the convolutions and matrix products that take an
    operand not dequantized from integers (they would compute in float)."""
    graph = model.graph
    produced_by = {output: node for node in graph.node for output in node.output}
    left = []
    for node in graph.node:
        if node.op_type not in _COMPUTE:
            continue
        operands = [name for name in node.input[:2] if name]
        if not all(
            name in produced_by and produced_by[name].op_type == DEQUANTIZE for name in operands
        ):
            left.append(f"{node.name} ({node.op_type})")
    return left
