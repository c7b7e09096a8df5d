"""The placement rules: what each kind of operation becomes in the
quantization network.

`PLACEMENT_RULES` is a table of `(applies(placement, operation),
place(placement, operation, args, kwargs) -> outputs)` pairs, tried in
order; `placement` is the `keras_qat.transforms.place.Placement` being
built, which knows the graph and makes the quantizers. A new kind of
operation is one small function here and a row of the table.
"""

import functools

import keras
import numpy as np

from keras_qat import graph, int8_rules, quantizers
from keras_qat.layers.activations import QuantSwish
from keras_qat.layers.attention_mask import AttentionScoreMask, QuantAttentionScoreMask
from keras_qat.layers.batch_broadcast import BatchBroadcast
from keras_qat.layers.conv2d_transpose import Conv2DTransposeBnAct
from keras_qat.layers.dense import DenseBnAct
from keras_qat.layers.embedding import QuantEmbedding
from keras_qat.layers.layer_norm import QuantLayerNormalization
from keras_qat.layers.learned_range import LearnedWeightQuantizer
from keras_qat.layers.quantized import has_quantized_form, quantized_class
from keras_qat.layers.resize import QuantResizing, QuantUpSampling2D
from keras_qat.layers.shared_range import (
    QuantAveragePooling1D,
    QuantAveragePooling2D,
    QuantConcatenate,
)
from keras_qat.transforms.clones import clone
from keras_qat.transforms.support import computes_integers, is_float, is_integer_cast

# Merge layers whose TFLite op takes two operands.
_BINARY_MERGES = (keras.layers.Add, keras.layers.Multiply)

# Average poolings and their shared-range forms.
_AVERAGE_POOLINGS = {
    keras.layers.AveragePooling1D: QuantAveragePooling1D,
    keras.layers.AveragePooling2D: QuantAveragePooling2D,
}


def _place_skipped(placement, layer, args, kwargs):
    """A float copy; a FakeQuant after it when a quantized layer uses it."""
    outputs = placement.clones.of(layer)(*args, **kwargs)
    if any(not placement.is_skipped(c) for c in placement.graph.consumers(layer)):
        outputs = placement.quantize_output(layer, outputs)
    return outputs


def _casts_integer_input(placement, operation):
    return is_integer_cast(operation, placement.graph)


def place_integer_cast(placement, operation, args, kwargs):
    """The cast (and scaling) in float, then a FakeQuant: the quantization
    network's first grid; uint8 pixels rescaled onto an exact 8-bit grid
    keep that grid, a fixed range (`int8_rules.uint8_pixel_range`)."""
    outputs = placement.clones.of(operation)(*args, **kwargs)
    return placement.quantize_output(operation, outputs, placement.pixel_range(operation))


def _on_int8_grid(constant):
    """A NumPy constant operand as the TFLite converter stores it: int8 on
    the asymmetric grid of its own min / max (a float constant left an ADD's
    outputs off by a step where this grid does not: docs/measurements.md).
    Other values are returned as they are."""
    if not isinstance(constant, np.ndarray) or constant.dtype != np.float32:
        return constant
    low, high = float(min(constant.min(), 0.0)), float(max(constant.max(), 0.0))
    return quantizers.fake_quant(constant, low, high, num_bits=8).numpy()


def _place_rounding_operation(placement, operation, args, kwargs):
    """`x + 3.0`, `x * y`, `keras.ops.matmul(q, k)`: the operation (a
    constant is in the node, put on the int8 grid the converter stores it
    on), then a FakeQuant (with softmax's fixed range)."""
    outputs = clone(operation)(*(_on_int8_grid(arg) for arg in args), **kwargs)
    fixed_range = int8_rules.fixed_output_range(operation)
    scales = _operand_scales(placement, operation, args)
    return placement.quantize_output(operation, outputs, fixed_range, operand_scales=scales)


def _operand_scales(placement, operation, args):
    """The grids of the two tensors a multiplication multiplies, for the
    `FakeQuant` that rounds the product; None for another operation, a
    constant operand or a grid not known."""
    operands = keras.tree.flatten(args)
    if not placement.multiplies(operation) or len(operands) != 2:
        return None
    if not all(isinstance(t, keras.KerasTensor) for t in operands):
        return None
    return placement.scales_of(operands)


def _place_constant(placement, operation, args, kwargs):
    """A weight operand, or an operation on weight operands only (a slice of
    a position table, `1 + scale`): computed as it is, since the converter
    folds them into one constant; where that constant meets other tensors
    it is stored on the int8 grid of its own range (a FakeQuant), or on the
    grid of the one concatenation it reaches (`concatenation_storing`)."""
    outputs = placement.clones.of(operation)(*args, **kwargs)
    if not is_float(outputs) or not placement.feeds_non_constant(operation):
        return outputs
    concatenation = placement.concatenation_storing(operation)
    if concatenation is not None:
        return placement.onto_grid_of(concatenation, operation, outputs)
    return placement.quantize_output(operation, outputs)


def concatenation_of(placement, layer):
    """The QuantConcatenate of `layer`, which quantizes the inputs that have
    no grid yet (made and built at its first use, which can be a call that
    puts one input on its grid: `Placement.onto_concatenation_grid`)."""
    new = placement.clones.of(
        layer,
        lambda: QuantConcatenate(
            **layer.get_config(),
            quantize_inputs=[placement.unrounded(p) for p in placement.graph.producers(layer)],
            quantizer=placement.shared_quantizer(layer),
        ),
    )
    if not new.built:
        new.build([tuple(t.shape) for t in keras.tree.flatten(layer.input)])
    return new


def _place_concatenation(placement, layer, args, kwargs):
    """A QuantConcatenate; the inputs that keep grids of their own are
    requantized onto its grid as XNNPACK does, given their grids' steps."""
    new = concatenation_of(placement, layer)
    kept = [x for x, flag in zip(args[0], new.input_flags(len(args[0]))) if not flag]
    scales = placement.scales_of(kept)
    if scales:
        new = functools.partial(new, input_scales=scales)
    return placement.apply_quantizer(new, args[0], placement.needs_scale(layer))


def _place_score_mask(placement, layer, args, kwargs):
    """A QuantAttentionScoreMask: the scores quantized, the excluded ones
    at the bottom of their grid."""
    new = placement.clones.of(
        layer,
        lambda: QuantAttentionScoreMask(
            **layer.get_config(),
            quantizer=placement.shared_quantizer(layer),
        ),
    )
    return new(*args, **kwargs)


def _is_shared_grid_pooling(placement, operation):
    return type(operation) in _AVERAGE_POOLINGS and placement.unrounded(
        placement.graph.producers(operation)[0]
    )


def _place_shared_grid_pooling(placement, layer, args, kwargs):
    """A QuantAveragePooling1D / 2D: input and output on one grid."""
    quantized = _AVERAGE_POOLINGS[type(layer)]
    new = placement.clones.of(
        layer,
        lambda: quantized(
            **layer.get_config(),
            quantizer=placement.shared_quantizer(layer),
        ),
    )
    return placement.apply_quantizer(new, args[0], placement.needs_scale(layer))


def _fuses_activation(layer):
    """Whether the integer kernel fuses `layer`'s activation (or it has none).
    TRANSPOSE_CONV fuses none: the TFLite converter (2.21) leaves a RELU after
    it in float, and the convolution with it."""
    name = int8_rules.activation_name(layer.activation)
    if isinstance(layer, Conv2DTransposeBnAct):
        return name == "linear"
    return name in ("linear",) + int8_rules.FUSED_ACTIVATIONS


def _quantized_clone(placement, layer):
    config = layer.get_config()
    options = placement.weight_options(layer, per_channel=_per_channel_by_default(placement, layer))
    learned = placement.options.range_learning[0]
    config["weight_quantizer"] = LearnedWeightQuantizer(**options) if learned else options
    folded = placement.options.bn_fold and layer.has_bn
    if folded:
        config["freeze_bn"] = placement.options.freeze_bn
    if not _fuses_activation(layer) or placement.moves_activation(layer):
        # Applied after: between two FakeQuants, or by the FakeQuant after it.
        config["activation"] = None
    return quantized_class(layer, folded)(**config)


def _per_channel_by_default(placement, layer):
    """Whether `layer`'s weights are per channel when `per_channel` is not
    given: convolution kernels are (each output channel of a conv has its own
    scale, and TFLite keeps it); dense kernels are per tensor, TFLite's
    FULLY_CONNECTED default and a smaller model, unless an unfolded BatchNorm
    follows (folding its per-channel scale into per-tensor weights would take
    them off their grid). Transposed-conv kernels are per tensor: the
    converter cannot carry a per-channel kernel into TRANSPOSE_CONV
    (`export.litert` says why)."""
    if isinstance(layer, Conv2DTransposeBnAct):
        return False
    if not isinstance(layer, DenseBnAct):
        return True
    return layer.has_bn and not placement.options.bn_fold


def _place_fusion(placement, layer, args, kwargs):
    """The quantized layer, its FakeQuant and any activation it cannot fuse."""
    new = placement.clones.of(layer, lambda: _quantized_clone(placement, layer))
    outputs = new(args[0], **placement.scale_of(args[0]))
    if _fuses_activation(layer):
        return placement.quantize_output(
            layer, outputs, activation=placement.moves_activation(layer)
        )
    name = f"{layer.name}_activation"
    activation = _activation_layer(placement, layer.activation, name, layer.name)
    swish = isinstance(activation, QuantSwish)
    outputs = placement.apply_quantizer(placement.fake_quant(layer.name), outputs, swish)
    outputs, scales = (
        _swish(placement, activation, outputs) if swish else (activation(outputs), None)
    )
    fixed_range = int8_rules.FIXED_OUTPUT_RANGES.get(int8_rules.activation_name(layer.activation))
    return placement.quantize_output(layer, outputs, fixed_range, name=name, operand_scales=scales)


def _activation_layer(placement, activation, name, layer_name, calls_per_step=1):
    """An `Activation` layer, or the layer of an activation that TFLite
    computes as two int8 ops, its intermediate grid with the activation
    options of layer `layer_name`."""
    two_op = int8_rules.TWO_OP_ACTIVATIONS.get(int8_rules.activation_name(activation))
    if two_op is None:
        return keras.layers.Activation(activation, name=name)
    options = placement.activation_options(layer_name, calls_per_step)
    return two_op(quantizer=options, name=name)


def _place_rounding_layer(placement, layer, args, kwargs):
    """An activation, merge or global pooling layer, then its FakeQuant."""
    is_two_op = isinstance(layer, keras.layers.Activation) and (
        int8_rules.activation_name(layer.activation) in int8_rules.TWO_OP_ACTIVATIONS
    )
    new = placement.clones.of(
        layer,
        (lambda: _two_op_activation(placement, layer)) if is_two_op else None,
    )
    if isinstance(layer, _BINARY_MERGES) and len(args[0]) > 2:
        args = (_merged_but_last(placement, layer, args[0]),) + tuple(args[1:])
    if isinstance(new, QuantSwish):
        outputs, scales = _swish(placement, new, args[0])
    else:
        outputs, scales = new(*args, **kwargs), _operand_scales(placement, layer, args)
    fixed_range = int8_rules.fixed_output_range(layer)
    return placement.quantize_output(layer, outputs, fixed_range, operand_scales=scales)


def _swish(placement, layer, inputs):
    """`QuantSwish` `layer` on `inputs`, and the grids of its MUL's operands
    (the input's, the sigmoid's) when the input's is known."""
    outputs, sigmoid_scale = layer(inputs, return_sigmoid_scale=True)
    scales = placement.scales_of([inputs])
    return outputs, None if scales is None else scales + [sigmoid_scale]


def _merged_but_last(placement, layer, inputs):
    """TFLite's ADD and MUL take two operands, and Keras merges more one by
    one: the inputs but the last merged so, each partial result rounded
    (`<name>_<k>` then its FakeQuant); the last pair is the layer's."""
    merged = inputs[0]
    for index, operand in enumerate(inputs[1:-1], start=1):
        name = f"{layer.name}_{index}"
        partial = type(layer)(name=name, dtype=layer.dtype_policy)([merged, operand])
        quantizer = placement.fake_quant(name, layer_name=layer.name)
        merged = placement.apply_quantizer(quantizer, partial, False)
    return [merged, inputs[-1]]


def _two_op_activation(placement, layer):
    calls = placement.graph.call_count(layer)
    return _activation_layer(placement, layer.activation, layer.name, layer.name, calls)


def _moves_into_fake_quant(placement, layer):
    """A ReLU / ReLU6 layer with a `FakeQuant` after it: that `FakeQuant`
    applies it (the integer op before it clamps to its grid)."""
    return int8_rules.is_fused_activation(layer) and not placement.rounded_by_consumers(layer)


def _place_fused_activation(placement, layer, args, kwargs):
    """A `FakeQuant(activation=...)` in place of the activation layer."""
    activation = int8_rules.fused_activation(layer)
    return placement.quantize_output(layer, args[0], activation=activation)


def _place_embedding(placement, layer, args, kwargs):
    """A QuantEmbedding with the same table, quantized per tensor: its
    output keeps the table's grid (GATHER), so no FakeQuant follows."""
    options = placement.weight_options(layer)
    options["per_channel"] = False
    # Embedding's own options (ReversibleEmbedding and subclasses add theirs).
    config = keras.layers.Embedding.get_config(layer)
    new = placement.clones.of(layer, lambda: QuantEmbedding(**config, weight_quantizer=options))
    return placement.apply_quantizer(new, args[0], placement.needs_scale(layer))


def _place_layer_normalization(placement, layer, args, kwargs):
    """A QuantLayerNormalization (its intermediate results rounded as
    TFLite's int8 ops round them), then the FakeQuant of its output."""
    calls = placement.graph.call_count(layer)
    activations = placement.activation_options(layer.name, calls)
    weights = dict(placement.weight_options(layer), per_channel=False)
    if activations.get("num_bits") == 16:  # gamma and beta are operands of int16 ops
        weights["num_bits"] = 16
    new = placement.clones.of(
        layer,
        lambda: QuantLayerNormalization(
            **dict(layer.get_config(), axis=-1),  # the last axis (checked)
            quantizer=activations,
            weight_quantizer=weights,
        ),
    )
    return placement.quantize_output(layer, new(args[0]))


# Elementwise operations whose int8 kernels broadcast a batch axis of 1.
_BROADCASTING = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    graph.ADD_OPERATION,
    graph.SUBTRACT_OPERATION,
    graph.MULTIPLY_OPERATION,
)


def _broadcast_by_consumers(placement, op):
    """A `BatchBroadcast` (a traced `broadcast_to` of one row to the batch,
    such as keras-hub's position table) whose consumers all broadcast the
    batch axis themselves: left out. TF 2.20's converter left the
    BROADCAST_TO of a constant, and the ADD after it, in float."""
    if not isinstance(op, BatchBroadcast):
        return False
    consumers = graph.consumer_operations(op)
    return bool(consumers) and all(isinstance(c, _BROADCASTING) for c in consumers)


def _place_dropped_broadcast(placement, layer, args, kwargs):
    """The row itself, which its consumers broadcast."""
    return args[0][0]


def _place_bilinear_resize(placement, layer, args, kwargs):
    """A QuantUpSampling2D / QuantResizing: the int8 kernel's rounding onto
    the input's grid, which its output keeps."""
    quantized = QuantUpSampling2D if isinstance(layer, keras.layers.UpSampling2D) else QuantResizing
    new = placement.clones.of(layer, lambda: quantized(**layer.get_config()))
    return placement.keep_scale(args[0], new(args[0], **placement.scale_of(args[0])))


def _place_integer_operation(placement, operation, args, kwargs):
    """An operation on integer or boolean tensors (a mask): as it is."""
    return placement.clones.of(operation)(*args, **kwargs)


def _place_grid_keeping(placement, layer, args, kwargs):
    """Kept as it is; its output lies on its (first) input's grid (an
    `AttentionWeightMask` takes `[weights, mask]`)."""
    first = keras.tree.flatten(args)[0]
    return placement.keep_scale(first, placement.clones.of(layer)(*args, **kwargs))


PLACEMENT_RULES = (
    (lambda placement, op: placement.is_skipped(op), _place_skipped),
    (lambda placement, op: placement.is_constant(op), _place_constant),
    (_casts_integer_input, place_integer_cast),
    (lambda placement, op: computes_integers(op, placement.graph), _place_integer_operation),
    (
        lambda placement, op: isinstance(op, int8_rules.ROUNDING_OPERATIONS),
        _place_rounding_operation,
    ),
    (lambda placement, op: isinstance(op, keras.layers.Concatenate), _place_concatenation),
    (lambda placement, op: type(op) is AttentionScoreMask, _place_score_mask),
    (_is_shared_grid_pooling, _place_shared_grid_pooling),
    (lambda placement, op: has_quantized_form(op), _place_fusion),
    (_moves_into_fake_quant, _place_fused_activation),
    (lambda placement, op: isinstance(op, int8_rules.ROUNDING_LAYERS), _place_rounding_layer),
    (lambda placement, op: int8_rules.is_embedding(op), _place_embedding),
    (
        lambda placement, op: type(op) is keras.layers.LayerNormalization,
        _place_layer_normalization,
    ),
    (lambda placement, op: int8_rules.is_bilinear_resize(op), _place_bilinear_resize),
    (_broadcast_by_consumers, _place_dropped_broadcast),
    (lambda placement, op: True, _place_grid_keeping),
)
