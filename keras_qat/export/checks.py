"""check_exportable: everything that keeps a quantization network from an
integer TFLite model, found before the converter runs.

The checks are rules per quantizer role (`keras_qat.quantizer_roles`): every
activation grid (a layer's output, or an intermediate result inside it) and
every weight quantizer (kernels, embedding tables, layer norms' `gamma` and
`beta`) is checked the same way, whatever layer holds it; a few rules
belong to a kind of layer (the kernel layout and int32 bias of the fusion
layers, int16 concatenation).
"""

import keras
import tensorflow as tf

from keras_qat import graph, quantizer_roles
from keras_qat.layers import bn_folding
from keras_qat.layers.attention_mask import QuantAttentionScoreMask
from keras_qat.layers.conv2d_transpose import Conv2DTransposeBnAct
from keras_qat.layers.embedding import QuantEmbedding
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.fusion import FusionLayer
from keras_qat.layers.shared_range import QuantConcatenate

ACTIVATION_TYPES = ("int8", "int16")


def check_activation_type(activations):
    """Raises `ValueError` for an `activations` other than int8 / int16."""
    if activations not in ACTIVATION_TYPES:
        raise ValueError(
            "Received an invalid value for `activations`, expected 'int8' or 'int16'. "
            f"Received: activations={activations!r}"
        )


def _delay_problems(quantizer, name):
    step = int(quantizer.steps())
    if step < quantizer.quant_delay:
        return [f"{name} is still in its quant delay ({step} of {quantizer.quant_delay} steps)"]
    return []


def _grid_problems(quantizer, name, activations):
    """An activation grid (a layer's output or an intermediate result)."""
    problems = []
    if quantizer.fixed_range is None and not bool(quantizer.has_range()):
        problems.append(
            f"{name} has no range: it has never seen a training batch with finite, "
            "non-zero values (a layer whose outputs are all zero, such as a dead ReLU, "
            "has none; train it, or remove the layer)"
        )
    else:
        problems += _delay_problems(quantizer, name)
    if activations == "int16":
        problems += _int16_problems(quantizer, name)
    elif quantizer.num_bits != 8:
        problems.append(
            f"{name} quantizes activations to {quantizer.num_bits} bits; int8 TFLite needs 8"
        )
    if quantizer.per_channel:
        problems.append(f"{name} is per channel; TFLite activations are per tensor")
    return problems


def _int16_problems(quantizer, name):
    """What keeps a grid from TFLite's int16 activations: 16 bits, a
    symmetric narrow grid (zero point 0), a range of its own."""
    if quantizer.fixed_range is not None:
        return [
            f"{name} has a fixed range (the int8 output grid of a softmax, sigmoid, tanh or "
            "a two-op activation), which the int16 export does not handle"
        ]
    if quantizer.num_bits != 16 or not (quantizer.symmetric and quantizer.narrow_range):
        return [
            f"{name} quantizes to {quantizer.num_bits} bits, "
            f"{'symmetric' if quantizer.symmetric else 'asymmetric'}"
            f"{'' if quantizer.narrow_range else ', on the full grid'}; int16 activations "
            "need 16 bits, symmetric, narrow (zero point 0): convert with num_bits=[8, 16], "
            "symmetric=[True, True], narrow_range=[True, True]"
        ]
    return []


def _weight_problems(quantizer, name, activations, bits=8):
    """Weights of any layer: symmetric int8 (or fewer bits; `bits` for an
    int16 operand), past the delay."""
    problems = []
    if not (quantizer.symmetric and quantizer.narrow_range):
        problems.append(
            f"{name} has asymmetric weights; TFLite int8 weights have zero point 0 "
            "(convert with symmetric=[True, ...], narrow_range=[True, ...])"
        )
    if quantizer.num_bits > bits:
        problems.append(f"{name} has {quantizer.num_bits}-bit weights; int8 TFLite holds at most 8")
    return problems + _delay_problems(quantizer, name)


# Quantizer role kind -> the rule of its quantizers.
ROLE_RULES = {
    quantizer_roles.WEIGHTS: _weight_problems,
    quantizer_roles.OUTPUT: _grid_problems,
    quantizer_roles.INTERMEDIATE: _grid_problems,
}


def _fusion_layer_problems(layer, name, activations):
    """A quantized fusion layer's kernel layout and int32 bias."""
    problems = _scale_layout_problems(layer, name)
    if _adds_int32_bias(layer) and any(
        "input_scale" not in kwargs for _, kwargs in graph.node_arguments(layer)
    ):
        problems.append(
            f"{name} adds its bias in float: it is called without the `input_scale` "
            "of a FakeQuant before it, so its bias is not on the int32 grid TFLite "
            "rounds it to (build the model with convert_quant_network)"
        )
    if _adds_int32_bias(layer) and _largest_int32_bias(layer) > 2**31 - 1:
        problems.append(
            f"{name} has a bias that overflows TFLite's int32 bias grid (input scale x "
            "weight scale): its input's range is too narrow for its bias"
        )
    return problems


def _concatenation_problems(layer, name, activations):
    if activations == "int16":
        return [
            f"{name}: TF 2.21's converter has no int16 CONCATENATION ('tfl.concatenation' "
            "takes no 16-bit quantized operands)"
        ]
    fixed = _fixed_range_inputs(layer)
    if not fixed:
        return []
    return [
        f"{name} puts {', '.join(fixed)} on its own grid, but their ranges are fixed by TFLite's "
        "kernels (sigmoid, hard sigmoid, tanh, softmax) and TF 2.21's converter does not "
        "requantize such an output for CONCATENATION (it fails on 'the same scale "
        "constraint'); apply that activation after the concatenation, or keep the "
        "concatenation in float with skip_layers"
    ]


def _fixed_range_inputs(layer):
    """The names of the fixed-range `FakeQuant`s whose outputs `layer` (a
    `QuantConcatenate`) quantizes onto another range."""
    quantizer = layer.quantizer
    shared = (float(quantizer.min), float(quantizer.max)) if quantizer.built else None
    names = []
    for args, _ in graph.node_arguments(layer):
        inputs = keras.tree.flatten(args[0] if args else [])
        flags = layer.quantize_inputs or [True] * len(inputs)
        for tensor, flag in zip(inputs, flags):
            producer = _fixed_range_producer(tensor)
            if flag and producer is not None and producer.fixed_range != shared:
                names.append(f"'{producer.name}'")
    return list(dict.fromkeys(names))


def _fixed_range_producer(tensor):
    """The fixed-range `FakeQuant` that computes `tensor`, or None."""
    producer = graph.producer(tensor) if isinstance(tensor, keras.KerasTensor) else None
    if isinstance(producer, FakeQuant) and producer.fixed_range is not None:
        return producer
    return None


def _int8_table_problems(layer, name, activations):
    """An embedding's GATHER output is on its int8 table's grid; the 16x8
    converter takes no int8 operand in an int16 op."""
    if activations != "int16":
        return []
    return [
        f"{name}: its int8 weights are an operand of an activation op, which TF 2.21's 16x8 "
        "converter fails on; export it with int8 activations, or keep it in float with "
        "skip_layers"
    ]


def _operand_problems(quantizer, name, activations):
    """Weights that are operands of activation ops (a layer norm's `gamma`
    and `beta`): as other weights in an int8 model; 16-bit in a 16x8 one,
    whose int16 ops take no int8 operand."""
    if activations != "int16":
        return _weight_problems(quantizer, name, activations)
    problems = _weight_problems(quantizer, name, activations, bits=16)
    if quantizer.num_bits != 16:
        problems.insert(
            0,
            f"{name} has {quantizer.num_bits}-bit weights, an operand of int16 activation ops, "
            "which take 16-bit operands (convert_quant_network gives them 16 bits with "
            "16-bit activations)",
        )
    return problems


def _causal_mask_problems(layer, name, activations):
    """A causal mask over a sequence of unknown length: the mask is computed
    from the run-time shape, which the converter leaves in float around the
    attention's BATCH_MATMULs."""
    if not layer.causal:
        return []
    lengths = [
        tuple(keras.tree.flatten(args)[0].shape[-2:]) for args, _ in graph.node_arguments(layer)
    ]
    if all(None not in shape for shape in lengths):
        return []
    return [
        f"{name}: a causal mask over a sequence of unknown length {lengths}: TFLite's converter "
        "cannot make it an int8 op; build the model with keras.Input((length, ...)) of a fixed "
        "length"
    ]


# Rules of kinds of layers, beyond their quantizers' roles.
LAYER_RULES = (
    (lambda layer: isinstance(layer, FusionLayer) and layer.quantized, _fusion_layer_problems),
    (lambda layer: isinstance(layer, QuantConcatenate), _concatenation_problems),
    (lambda layer: isinstance(layer, QuantEmbedding), _int8_table_problems),
    (lambda layer: isinstance(layer, QuantAttentionScoreMask), _causal_mask_problems),
)


def _scale_layout_problems(layer, name):
    """Weight scales (per tensor or per channel) that the int8 kernel cannot
    take as the layer has them."""
    per_channel = layer.weight_quantizer.per_channel
    problems = []
    if layer.has_bn and not per_channel and not layer.folded:
        problems.append(
            f"{name} has per-tensor weights followed by a BatchNorm: folding the "
            "BatchNorm's per-channel scale into them leaves them off their single "
            "int8 grid (use bn_fold=True or per_channel=[True, ...] for weights)"
        )
    if per_channel and isinstance(layer, Conv2DTransposeBnAct):
        problems.append(
            f"{name} has per-channel weights: the TFLite converter (2.21) cannot "
            "carry a per-channel kernel through the transpose to TRANSPOSE_CONV's "
            "layout ('tfl.transpose' op has mismatched quantized axes); convert with "
            "per_channel=None (per tensor for transposed convolutions) or False"
        )
    return problems


def _largest_int32_bias(layer):
    """The largest |bias| in units of its int32 grid over the layer's calls
    (0 without a known input scale): above 2**31 - 1 TFLite's bias overflows."""
    quantizer = layer.weight_quantizer
    bias = bn_folding.folded_bias(layer) if layer.folded else layer.linear_layer.bias
    weight_scale = quantizer.grid_scale(*quantizer.range(layer.quantized_kernel()))
    largest = 0.0
    for _, kwargs in graph.node_arguments(layer):
        source = graph.producer(kwargs.get("input_scale"))
        input_quantizer = quantizer_roles.quantizers_of(source).get(quantizer_roles.OUTPUT)
        if isinstance(input_quantizer, FakeQuant):
            scale = input_quantizer.grid_scale(input_quantizer.min, input_quantizer.max)
            levels = tf.math.divide_no_nan(tf.abs(tf.cast(bias, tf.float32)), scale * weight_scale)
            largest = max(largest, float(tf.reduce_max(levels)))
    return largest


def _adds_int32_bias(layer):
    """Whether the integer kernel adds this quantized layer's bias in int32
    from its own weights (an unfolded BatchNorm's bias is TFLite's fold)."""
    return layer.folded or (layer.linear_layer.use_bias and layer.bn is None)


def _describe(layer, role):
    """`'name' (Class)`, and the role where a layer has several quantizers."""
    if len(quantizer_roles.quantizers_of(layer)) > 1:
        return f"'{layer.name}' ({layer.__class__.__name__}, {role})"
    return f"'{layer.name}' ({layer.__class__.__name__})"


def find_problems(qat_model, activations="int8"):
    """Every problem `check_exportable` reports, one string each."""
    problems, seen = [], set()
    for layer, role, quantizer in quantizer_roles.model_quantizers(qat_model):
        if id(layer) not in seen:
            seen.add(id(layer))
            name = f"'{layer.name}' ({layer.__class__.__name__})"
            for applies, rule in LAYER_RULES:
                problems += rule(layer, name, activations) if applies(layer) else []
        rule = ROLE_RULES[quantizer_roles.kind(role)]
        if role in _activation_operands(layer):
            rule = _operand_problems
        problems += rule(quantizer, _describe(layer, role), activations)
    return problems


def _activation_operands(layer):
    method = getattr(layer, "activation_operands", None)
    return method() if callable(method) else ()


def check_exportable(qat_model, activations="int8"):
    """Raises `ValueError` listing everything that keeps `qat_model` from int8.

    An int8 TFLite model needs every range calibrated and past its quant
    delay, 8-bit per-tensor activations, and weights of at most 8 bits that
    are symmetric with zero point 0 (`symmetric=True, narrow_range=True` for
    weights): TFLite's int8 kernels assume a zero weight zero point, so
    asymmetric weights would run, silently wrong. Every quantizer is
    checked by its role (`keras_qat.quantizer_roles`): kernels, embedding
    tables and layer norms' `gamma` / `beta` as weights, outputs and
    intermediate results as activation grids. The converter folds a
    BatchNorm that follows fake-quantized weights into them; that is exact
    for per-channel weights (each channel's scale changes, its levels do
    not) but not for per-tensor weights. A quantized layer must know its
    input's scale (`input_scale`) to add its bias as the integer kernel
    does. With `activations="int16"` every activation grid must instead be
    16-bit, symmetric and narrow (TFLite's int16 tensors have zero point 0),
    and not a fixed output range.

    Args:
        qat_model: A quantization network.
        activations: `"int8"` or `"int16"`, as in `export_tflite`.

    Raises:
        ValueError: listing every problem, one per line, each naming its
            layer, or for an unknown `activations`.
    """
    check_activation_type(activations)
    problems = find_problems(qat_model, activations)
    if problems:
        kind = "an int8" if activations == "int8" else "a 16x8 (int16 activations)"
        raise ValueError(
            f"This quantization network cannot be exported as {kind} TFLite model:\n- "
            + "\n- ".join(problems)
        )
