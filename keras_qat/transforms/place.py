"""convert_quant_network: a float network to a quantization network.

The converter decides where things go, following `keras_qat.int8_rules`:
fusion layers become their quantized counterparts (weights copied), a
`FakeQuant` goes wherever the integer model rounds a result onto a grid of
its own, and other layers are cloned as they are. `PLACEMENT_RULES` is the
table: for each kind of operation, the small function that places it.

A `FakeQuant` whose output reaches a quantized layer (directly or through
layers that keep its grid) is called with `return_grid=True`, and the
quantized layer with `input_grid=` that grid: the input scale of its int32
bias is an edge of the Keras graph, saved and loaded with it.
"""

import keras
import numpy as np

from keras_qat import graph, int8_rules, quantizers
from keras_qat.config import DEFAULT_FREEZE_BN, QuantOptions
from keras_qat.layers.activations import QuantHardSigmoid, QuantSwish
from keras_qat.layers.attention_mask import AttentionScoreMask, QuantAttentionScoreMask
from keras_qat.layers.embedding import QuantEmbedding
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct, DepthwiseConv2DBnAct, FusionLayer
from keras_qat.layers.layer_norm import QuantLayerNormalization
from keras_qat.layers.learned_range import LearnedFakeQuant, LearnedWeightQuantizer
from keras_qat.layers.more_convolutions import (
    Conv1DBnAct,
    Conv2DTransposeBnAct,
    DepthwiseConv1DBnAct,
)
from keras_qat.layers.quantized import (
    QuantConv1DBnAct,
    QuantConv1DBnFoldAct,
    QuantConv2DBnAct,
    QuantConv2DBnFoldAct,
    QuantConv2DTransposeBnAct,
    QuantConv2DTransposeBnFoldAct,
    QuantDenseBnAct,
    QuantDenseBnFoldAct,
    QuantDepthwiseConv1DBnAct,
    QuantDepthwiseConv1DBnFoldAct,
    QuantDepthwiseConv2DBnAct,
    QuantDepthwiseConv2DBnFoldAct,
)
from keras_qat.layers.resize import QuantResizing, QuantUpSampling2D
from keras_qat.layers.shared_range import QuantAveragePooling2D, QuantConcatenate
from keras_qat.transforms import attention, einsum_dense
from keras_qat.transforms.common import Clones, clone, selected_layer_names
from keras_qat.transforms.fuse import fusable_classes, fuse, has_fusable_layers, unfusable_reason
from keras_qat.transforms.inline import inline_nested_models

# Float fusion layer -> (quantized layer, quantized layer with BatchNorm folded).
QUANTIZED_LAYERS = {
    Conv2DBnAct: (QuantConv2DBnAct, QuantConv2DBnFoldAct),
    DenseBnAct: (QuantDenseBnAct, QuantDenseBnFoldAct),
    DepthwiseConv2DBnAct: (QuantDepthwiseConv2DBnAct, QuantDepthwiseConv2DBnFoldAct),
    Conv1DBnAct: (QuantConv1DBnAct, QuantConv1DBnFoldAct),
    DepthwiseConv1DBnAct: (QuantDepthwiseConv1DBnAct, QuantDepthwiseConv1DBnFoldAct),
    Conv2DTransposeBnAct: (QuantConv2DTransposeBnAct, QuantConv2DTransposeBnFoldAct),
}

# Layers through which a grid reaches a consumer: an average pooling that
# stays as it is (its input has other consumers) keeps its input's grid too.
_GRID_PASSING_LAYERS = (
    int8_rules.GRID_KEEPING_LAYERS
    + int8_rules.GRID_KEEPING_OPERATIONS
    + (keras.layers.AveragePooling2D,)
)

# Activations that TFLite computes as two int8 ops (int8_rules.TWO_OP_ACTIVATIONS).
TWO_OP_ACTIVATION_LAYERS = {"hard_sigmoid": QuantHardSigmoid, "silu": QuantSwish}


def convert_quant_network(
    model,
    bn_fold=True,
    freeze_bn=DEFAULT_FREEZE_BN,
    quant_delay=0,
    num_bits=(8, 8),
    per_channel=None,
    symmetric=(True, False),
    narrow_range=None,
    skip_layers=None,
    range_learning=False,
    layer_num_bits=None,
):
    """Converts a float network into a quantization network.

    The model is cloned layer by layer. The fusion layers (`Conv2DBnAct`,
    `DepthwiseConv2DBnAct`, `DenseBnAct`, `Conv1DBnAct`,
    `Conv2DTransposeBnAct`) become their `Quant...` counterparts with the
    original's weights (so a trained float model converts without
    retraining), and an `Embedding` a `QuantEmbedding` (its table quantized
    per tensor whatever `per_channel` says: a GATHER's output has one grid,
    the table's, and nothing rounds after it). A `FakeQuant` layer follows
    wherever an integer kernel rounds its result:

    - the model input, and each quantized layer's output (after its
      activation when that is None, ReLU or ReLU6, which integer kernels
      fuse; any other activation becomes an `Activation` layer between two
      `FakeQuant`s, so that the activation's input is quantized too);
    - each `Add`, `Subtract`, `Multiply`, `GlobalAveragePooling1D` / `2D`,
      and each
      Keras operation `+`, `-`, `*` on tensors (as in `x + 3.0`);
    - a `Concatenate` becomes a `QuantConcatenate`, which quantizes all its
      inputs with one shared range (TFLite requires one scale for all
      operands of a concatenation);
    - an `AveragePooling2D` whose input has no other consumer becomes a
      `QuantAveragePooling2D`: input and output share one range and the
      average is rounded as TFLite's int8 kernel rounds it;
    - each standalone `ReLU`, `LeakyReLU`, `Activation` and `Softmax`.
      Sigmoid, softmax and tanh outputs get the fixed ranges of TFLite's
      int8 kernels; a hard sigmoid becomes a `QuantHardSigmoid` and a
      swish / silu a `QuantSwish` (two int8 ops each in TFLite, with a
      rounding in between that these layers simulate).

    A layer whose every consumer is a ReLU / ReLU6 layer, a `Concatenate`
    or such an average pooling gets no `FakeQuant` of its own (unless it is
    a model output): the integer op rounds once, to its consumer's grid.

    Max pooling, flatten, reshape, dropout, padding and cropping layers, and
    nearest-neighbour `UpSampling1D` / `UpSampling2D` / `Resizing`, are kept
    as they are; a bilinear `UpSampling2D` / `Resizing` becomes a
    `QuantUpSampling2D` / `QuantResizing`, which rounds to its input's grid
    as TFLite's int8 kernel does. Layer names are kept; a `FakeQuant` is named after the
    layer it follows, plus `_quant`. With `bn_fold=True`, fusion layers with
    `has_bn=True` become the `Quant...BnFoldAct` layers instead.

    Every quantization option is a `(weights, activations)` pair, as in
    MindSpore's `convert_quant_network`; a single value applies to both. The
    defaults are TFLite's int8 scheme, so that `export_tflite` takes the
    result as it is; MindSpore's defaults (asymmetric weights, per tensor)
    are `symmetric=False, per_channel=False`.

    Nested models (a Functional or Sequential model used as a layer) are
    inlined first (`keras_qat.transforms.inline`), so the result is one flat
    Functional model. Then a plain model is fused (`keras_qat.fuse`): each
    `Conv2D` / `DepthwiseConv2D` / `SeparableConv2D` / `Dense` with the
    `BatchNormalization` and activation after it, and each per-channel
    affine layer on images (BatchNorm after no conv, `Rescaling`,
    `Normalization`), becomes fusion layers with the same weights.

    Args:
        model: A Sequential or Functional Keras model built from fusion
            layers or the plain layers above (fused first), possibly with
            nested models. It must be built (have an input shape).
        bn_fold: Whether a fusion layer's BatchNorm is folded into its
            weights (`QuantConv2DBnFoldAct`, ...): the fake-quantized weights
            are then exactly the deployed ones. With `False`, the raw weights
            are fake-quantized and an ordinary BatchNorm follows (what TFLite
            folds later, exactly only for per-channel weights). Default
            `True`, as in MindSpore.
        freeze_bn: Training step from which folded BatchNorm statistics are
            frozen (with `bn_fold=True`).
        quant_delay: Number of training steps before quantization starts;
            an integer >= 0 or a (weights, activations) pair.
        num_bits: Bit widths, integers in `[2, 16]`.
        per_channel: Per-channel ranges. Only weights may be per channel:
            `per_channel=[True, False]`. Default None: per channel for conv
            and depthwise kernels, per tensor for dense kernels (unless an
            unfolded BatchNorm follows them) and transposed-conv kernels (the
            TFLite converter cannot export those per channel).
        symmetric: Symmetric ranges. Default `(True, False)`: symmetric
            weights, asymmetric activations (TFLite's int8 scheme).
        narrow_range: Grids `[1, 2**b - 1]` instead of `[0, 2**b - 1]`.
            Default None: narrow where symmetric (TFLite's int8 weights are
            in `[-127, 127]`), full where not (MindSpore's asymmetric grids).
        range_learning: Learned ranges (LSQ, `keras_qat.layers.learned_range`):
            the grid step of the quantized layers' weights and of the
            activations' `FakeQuant`s (and of concatenations, average
            poolings and attention masks) becomes a trainable variable,
            started from the first training batch. Default False: min / max
            ranges. Embedding tables, layer norms' intermediates and
            fixed-range outputs keep min / max or fixed ranges.
        layer_num_bits: Bit widths of some layers, overriding `num_bits`:
            a dict from layer names (of `model`, or of its input layers) to
            one width or a `(weights, activations)` pair, None in a pair
            keeping `num_bits`' width. A layer's weights take the first; the
            `FakeQuant` of its output (of the model input, for an input's
            name; for a concatenation or average pooling, its shared range)
            the second. LSQ keeps the first and the last layers at 8 bits
            this way: `{"image": 8, "stem": (8, None), "pool": 8, "logits":
            8}` (the input and the stem's weights, the last layer's input,
            weights and output). A width that no quantizer takes (a layer
            without weights, an output its consumers round) raises.
        skip_layers: Layers to leave in float, neither fused nor quantized:
            layer names, layer classes, or a predicate `layer -> bool` (or
            a list of them), matched after nested models are inlined. A
            `FakeQuant` follows a skipped layer whose result a quantized
            layer uses. `export_tflite` then needs `allow_float_ops=True`.

    Returns:
        A new, uncompiled Functional model. `model` is left unchanged.

    Raises:
        ValueError: for an invalid option (the message names it), for a
            model that is not Sequential or Functional (such as a subclassed
            model), for an unbuilt model, for a `skip_layers` entry naming
            no layer, or for layers that cannot be quantized (all of them
            are listed, with their classes).

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((28, 28, 1)),
    ...     Conv2DBnAct(6, 5, activation="relu"),
    ...     keras.layers.Flatten(),
    ...     DenseBnAct(10),
    ... ])
    >>> qmodel = convert_quant_network(
    ...     model, quant_delay=900, per_channel=[True, False])
    >>> [layer.__class__.__name__ for layer in qmodel.layers]
    ['InputLayer', 'FakeQuant', 'QuantConv2DBnAct', 'FakeQuant', 'Flatten',
     'QuantDenseBnAct', 'FakeQuant']
    """
    options = QuantOptions.from_args(
        num_bits=num_bits,
        per_channel=per_channel,
        symmetric=symmetric,
        narrow_range=narrow_range,
        quant_delay=quant_delay,
        bn_fold=bn_fold,
        freeze_bn=freeze_bn,
        range_learning=range_learning,
        layer_num_bits=layer_num_bits,
    )
    _check_model(model)
    model = inline_nested_models(model)
    skipped = selected_layer_names(model, skip_layers)
    _check_layer_names(model, dict(options.layer_num_bits))
    if attention.has_decomposable_attention(model, skipped):
        # MultiHeadAttention -> its Dense projections and Keras operations.
        model = attention.decompose_attention(model, skipped)
    if einsum_dense.has_decomposable_einsum_dense(model, skipped):
        # EinsumDense -> Reshape, Dense, Reshape.
        model = einsum_dense.decompose_einsum_dense(model, skipped)
    if has_fusable_layers(model):
        # Plain Conv2D / Dense (+ BN, activation), affine layers -> fusion layers.
        model = fuse(model, skip_layers=sorted(skipped))
    _check_supported(model, skipped)
    return _Placement(options, model, skipped).convert()


def _check_model(model):
    """Raises `ValueError` for a model that cannot be converted at all."""
    graph.functional_graph(model)  # a clear error for subclassed and unbuilt models
    if not model.built or not model.inputs:
        raise ValueError(
            f"Model '{model.name}' has no input shape yet. Start it with "
            "keras.Input(shape) or call it on data before converting it."
        )
    quantized = [layer.name for layer in graph.all_layers(model) if _is_quantized(layer)]
    if quantized:
        raise ValueError(
            f"Model '{model.name}' is already a quantization network (it has quantized "
            f"layers: {', '.join(quantized[:5])}{', ...' if len(quantized) > 5 else ''}). "
            "Convert the float model instead, or train this one as it is."
        )


def _check_layer_names(model, layer_num_bits):
    """Raises `ValueError` for a `layer_num_bits` key that names no layer."""
    names = [layer.name for layer in model.layers]
    unknown = [name for name in layer_num_bits if name not in names]
    if unknown:
        raise ValueError(
            f"Received an invalid value for `layer_num_bits`: model '{model.name}' has no "
            f"layer named {', '.join(repr(n) for n in unknown)}. Its layers: "
            f"{', '.join(names)}. Received: layer_num_bits={layer_num_bits!r}"
        )


def _is_quantized(layer):
    quantized = (
        FakeQuant,
        QuantConcatenate,
        QuantAveragePooling2D,
        QuantEmbedding,
        QuantLayerNormalization,
        QuantAttentionScoreMask,
        QuantUpSampling2D,
        QuantResizing,
    )
    return isinstance(layer, quantized) or (isinstance(layer, FusionLayer) and layer.quantized)


def _is_supported(operation, graph_view):
    if _is_integer_cast(operation, graph_view):
        return True
    if int8_rules.unsupported_reason(operation) is not None or _float64_constant(operation):
        return False
    if isinstance(operation, graph.MATMUL_OPERATION):  # of two tensors, not a constant
        return len(graph_view.input_tensors(operation)) == 2
    if not isinstance(operation, keras.layers.Layer):
        return isinstance(
            operation, int8_rules.ROUNDING_OPERATIONS + int8_rules.GRID_KEEPING_OPERATIONS
        )
    if type(operation) in (keras.layers.Embedding, keras.layers.LayerNormalization):
        return True
    return type(operation) in QUANTIZED_LAYERS or isinstance(
        operation,
        int8_rules.ROUNDING_LAYERS
        + int8_rules.GRID_KEEPING_LAYERS
        + int8_rules.SHARED_GRID_LAYERS
        + (keras.layers.InputLayer,),
    )


def _check_supported(model, skipped):
    """Raises one `ValueError` listing every layer that cannot be converted."""
    graph_view = graph.Graph(model)
    unsupported = [
        _describe(op, graph_view)
        for op in graph_view.operations
        if op.name not in skipped and not _is_supported(op, graph_view)
    ]
    if unsupported:
        raise ValueError(
            "`convert_quant_network` cannot quantize these layers of model "
            f"'{model.name}': {', '.join(unsupported)}. Supported: Conv1D / "
            "Conv2D / Conv2DTranspose / DepthwiseConv2D / SeparableConv2D / "
            "Dense with the BatchNormalization and activation after them, "
            "EinsumDense (a Dense on trailing axes), MultiHeadAttention, "
            "BatchNormalization, Rescaling and Normalization (last axis) on 4D "
            "inputs, the fusion layers, Embedding (without mask_zero), "
            "LayerNormalization (last axis), merge "
            "layers (Add, Subtract, Multiply, Concatenate), "
            "GlobalAveragePooling1D/2D, activation layers (ReLU, LeakyReLU, "
            "Activation, Softmax), the Keras operations +, - and * between "
            "tensors or with constants, matmul of two tensors, mean, gelu, "
            "softmax (last axis), reshape, transpose, expand_dims, squeeze and "
            "slicing, and layers that keep their input's "
            "grid ("
            + ", ".join(c.__name__ for c in int8_rules.GRID_KEEPING_LAYERS)
            + ", AveragePooling2D; resizing with interpolation='nearest'; bilinear "
            "resizing rounds to its input's grid). "
            "To keep layers in float, pass them to "
            "`skip_layers` (names, classes or a predicate)."
        )


def _float64_constant(operation):
    """Whether a Keras operation has a float64 NumPy constant (`x *
    np.sqrt(d)`), which makes Keras compute it, and what follows, in
    float64: no int8 kernel does."""
    if isinstance(operation, keras.layers.Layer):
        return False
    constants = keras.tree.flatten(graph.node_arguments(operation))
    return any(
        isinstance(c, (np.ndarray, np.floating)) and c.dtype == np.float64 for c in constants
    )


def _describe(operation, graph_view):
    """`'name' (Class)`, with the reason when a known attribute is the problem."""
    reason = unfusable_reason(operation) if isinstance(operation, fusable_classes()) else None
    reason = reason or int8_rules.unsupported_reason(operation)
    if isinstance(operation, keras.layers.MultiHeadAttention):
        reason = attention.unsupported_reason(operation)
    if type(operation) is keras.layers.EinsumDense:
        reason = einsum_dense.unsupported_reason(operation)
    if _float64_constant(operation):
        reason = (
            "a float64 NumPy constant, which makes Keras compute in float64; use a "
            "Python float or a float32 array"
        )
    elif isinstance(operation, graph.MATMUL_OPERATION):
        reason = "a matmul with a constant; use a Dense or EinsumDense layer"
    reason = f": {reason}" if reason else ""
    kind = "" if isinstance(operation, keras.layers.Layer) else "Keras operation "
    return f"'{operation.name}' ({kind}{operation.__class__.__name__}{reason})"


class _Placement:
    """Builds the quantization network of one fusion network.

    `convert()` rebuilds the graph, calling `place(operation, ...)` at each
    node; `place` picks the rule of `PLACEMENT_RULES` that applies.
    """

    def __init__(self, options, model, skipped):
        self.options = options
        self.graph = graph.Graph(model)
        self.model = model
        self.skipped = set(skipped)
        self.names = {layer.name for layer in model.layers}
        self.clones = Clones()
        self.bits_used = set()  # (layer name, 0 weights / 1 activations)
        self.grids = {}  # id(new tensor) -> the scale of its grid (a tensor)
        self.quantized_inputs = {}  # id(new model input) -> its FakeQuant output
        self.input_layers = {  # the rebuilt model's inputs keep these names
            layer.name: layer for layer in self.graph.input_layers
        }

    def convert(self):
        qmodel = graph.rebuild(self.model, self.place)
        self.clones.copy_weights()
        self.check_layer_num_bits_used()
        return qmodel

    def weight_options(self, layer, **kwargs):
        """The options of `layer`'s weight quantizer (`QuantOptions.weight_options`)."""
        self.bits_used.add((layer.name, 0))
        return self.options.weight_options(
            self.graph.call_count(layer), layer_name=layer.name, **kwargs
        )

    def activation_options(self, layer_name, calls_per_step=1):
        """The options of a `FakeQuant` on the output of `layer_name`."""
        self.bits_used.add((layer_name, 1))
        return self.options.activation_options(calls_per_step, layer_name=layer_name)

    def check_layer_num_bits_used(self):
        """Raises `ValueError` for a `layer_num_bits` width that no quantizer took."""
        unused = []
        for name, _ in self.options.layer_num_bits:
            taken = [(name, index) in self.bits_used for index in (0, 1)]
            if name in self.options.single_width_layers:
                unused += [] if any(taken) else [f"'{name}'"]
                continue
            unused += [
                f"'{name}' {kind}"
                for index, kind in enumerate(("weights", "activations"))
                if self.options.bits_of(name, index) is not None and not taken[index]
            ]
        if unused:
            raise ValueError(
                "Received an invalid value for `layer_num_bits`: these layers have no such "
                f"quantizer (or none at all) in model '{self.model.name}': "
                f"{', '.join(unused)} (a layer without "
                "weights has no weight width; a layer whose consumers round its result, such "
                "as a conv before a ReLU layer, has no FakeQuant of its own: name the "
                "consumer, or use None in the pair). "
                f"Received: layer_num_bits={dict(self.options.layer_num_bits)!r}"
            )

    def place(self, operation, *args, **kwargs):
        args, kwargs = keras.tree.map_structure(self.quantize_model_input, (args, kwargs))
        for applies, rule in PLACEMENT_RULES:
            if applies(self, operation):
                return rule(self, operation, args, kwargs)
        raise AssertionError(f"no placement rule for {operation!r}")  # unreachable

    # Where the integer model rounds.

    def is_skipped(self, operation):
        return operation.name in self.skipped

    def rounds_output(self, operation):
        """Whether `operation`'s integer result is rounded onto a new grid."""
        return (
            type(operation) in QUANTIZED_LAYERS
            or isinstance(operation, int8_rules.ROUNDING_LAYERS + int8_rules.ROUNDING_OPERATIONS)
            or self.is_skipped(operation)  # a float result
            or _casts_integer_input(self, operation)
        )

    def rounded_by_consumers(self, operation):
        """Whether every consumer of `operation` rounds its result onto the
        consumer's own grid (int8_rules.rounds_for_producer)."""
        consumers = self.graph.consumers(operation)
        return (
            bool(consumers)
            and not self.graph.is_output(operation)
            and all(not self.is_skipped(c) and int8_rules.rounds_for_producer(c) for c in consumers)
        )

    def unrounded(self, operation):
        """Whether `operation`'s result leaves it without a grid of its own,
        for its consumers to round."""
        return self.rounds_output(operation) and self.rounded_by_consumers(operation)

    def needs_grid(self, operation):
        """Whether a quantized layer (or a bilinear resize, which rounds to
        its input's grid) consumes `operation`'s output, directly or through
        layers that keep its grid."""
        for consumer in self.graph.consumers(operation):
            if int8_rules.is_bilinear_resize(consumer) and not self.is_skipped(consumer):
                return True
            if isinstance(consumer, _GRID_PASSING_LAYERS):
                if self.needs_grid(consumer):
                    return True
            elif type(consumer) in QUANTIZED_LAYERS and not self.is_skipped(consumer):
                return True
        return False

    # Quantizers.

    def feeds_matmul_rhs(self, operation):
        """Whether `operation`'s output is the second operand of a
        `keras.ops.matmul`, directly or through layers that keep its grid.

        TFLite's int8 BATCH_MATMUL ignores that operand's zero point (an
        asymmetric one was measured off by up to 95 steps), so its grid must
        be zero-centred: symmetric, on the narrow grid (zero point 0).
        """
        for consumer in self.graph.consumers(operation):
            if isinstance(consumer, _GRID_PASSING_LAYERS):
                if self.feeds_matmul_rhs(consumer):
                    return True
            elif isinstance(consumer, graph.MATMUL_OPERATION) and not self.is_skipped(consumer):
                operands = self.graph.input_tensors(consumer)
                if len(operands) == 2 and graph.producer(operands[1]) is operation:
                    return True
        return False

    def fake_quant(
        self, name, fixed_range=None, activation=None, zero_centred=False, layer_name=None
    ):
        """A new `FakeQuant` named `<name>_quant` (made unique), applying a
        fused `activation` (None, "relu", "relu6") before it quantizes; with
        `zero_centred`, symmetric on the narrow grid. It quantizes the output
        of layer `layer_name` (default `name`), whose `layer_num_bits` apply."""
        base = candidate = f"{name}_quant"
        suffix = 1
        while candidate in self.names:  # Keras operations may share a name with a layer
            suffix += 1
            candidate = f"{base}_{suffix}"
        self.names.add(candidate)
        options = self.activation_options(layer_name or name)
        if zero_centred:
            options.update(symmetric=True, narrow_range=True)
        learned = self.options.range_learning[1] and fixed_range is None
        quantizer_class = LearnedFakeQuant if learned else FakeQuant
        return quantizer_class(
            name=candidate, fixed_range=fixed_range, activation=activation, **options
        )

    def shared_quantizer(self, layer):
        """The `quantizer` of a layer that holds its output's range (a
        concatenation, an average pooling, an attention mask): options, or a
        `LearnedFakeQuant` with learned activation ranges."""
        options = self.activation_options(layer.name, self.graph.call_count(layer))
        return LearnedFakeQuant(**options) if self.options.range_learning[1] else options

    def apply_quantizer(self, quantizer, tensor, with_grid):
        """`quantizer(tensor)`; with `with_grid`, the grid is kept for the
        quantized layers that consume the result."""
        if not with_grid:
            return quantizer(tensor)
        outputs, grid = quantizer(tensor, return_grid=True)
        self.grids[id(outputs)] = grid
        return outputs

    def quantize_output(self, operation, outputs, fixed_range=None, name=None, activation=None):
        """A `FakeQuant` on `operation`'s result, unless its consumers round
        it (a fixed range is always kept: the kernel's output has it); with
        `activation`, the fused activation that the `FakeQuant` applies."""
        if fixed_range is None and self.rounded_by_consumers(operation):
            return quantizers.fused_activation(outputs, activation)
        zero_centred = fixed_range is None and self.feeds_matmul_rhs(operation)
        quantizer = self.fake_quant(
            name or operation.name, fixed_range, activation, zero_centred, operation.name
        )
        return self.apply_quantizer(quantizer, outputs, self.needs_grid(operation))

    def moves_activation(self, layer):
        """The fused activation ("relu", "relu6") of fusion layer `layer` that
        moves into the `FakeQuant` after it, or None (no such activation, or
        no `FakeQuant` after it: its consumers round its result)."""
        name = int8_rules.activation_name(layer.activation)
        if name not in int8_rules.FUSED_ACTIVATIONS or self.rounded_by_consumers(layer):
            return None
        return name

    def quantize_model_input(self, tensor):
        """The `FakeQuant` output of a float model input; other values
        (integer inputs among them: see `_place_integer_cast`) unchanged."""
        layer = graph.producer(tensor) if isinstance(tensor, keras.KerasTensor) else None
        if not isinstance(layer, keras.layers.InputLayer) or not _is_float(tensor):
            return tensor
        if id(tensor) not in self.quantized_inputs:
            original = self.input_layers[layer.name]
            self.quantized_inputs[id(tensor)] = self.apply_quantizer(
                self.fake_quant(layer.name, zero_centred=self.feeds_matmul_rhs(original)),
                tensor,
                self.needs_grid(original),
            )
        return self.quantized_inputs[id(tensor)]

    def keep_grid(self, inputs, outputs):
        """`outputs`, recorded as lying on the grid of `inputs` (if known)."""
        grid = self.grids.get(id(inputs))
        if grid is not None:
            self.grids[id(outputs)] = grid
        return outputs

    def grid_of(self, tensor):
        """`{"input_grid": grid}` for a quantized layer's call, or `{}`."""
        grid = self.grids.get(id(tensor))
        return {} if grid is None else {"input_grid": grid}


# Placement rules: (applies(placement, operation), place(placement,
# operation, args, kwargs) -> outputs), tried in order.


def _place_skipped(self, layer, args, kwargs):
    """A float copy; a FakeQuant after it when a quantized layer uses it."""
    outputs = self.clones.of(layer)(*args, **kwargs)
    if any(not self.is_skipped(c) for c in self.graph.consumers(layer)):
        outputs = self.quantize_output(layer, outputs)
    return outputs


def _is_float(tensor):
    return keras.backend.standardize_dtype(tensor.dtype).startswith(("float", "bfloat"))


def _is_integer_cast(operation, graph_view):
    """A Rescaling, Normalization or cast that turns an integer tensor (an
    integer model input, such as uint8 images) into a float one."""
    casts = (
        keras.layers.Rescaling,
        keras.layers.Normalization,
    ) + int8_rules.GRID_KEEPING_OPERATIONS
    inputs = graph_view.input_tensors(operation)
    return isinstance(operation, casts) and bool(inputs) and not _is_float(inputs[0])


def _casts_integer_input(self, operation):
    return _is_integer_cast(operation, self.graph)


def _place_integer_cast(self, operation, args, kwargs):
    """The cast (and scaling) in float, then a FakeQuant: the quantization
    network's first grid."""
    outputs = self.clones.of(operation)(*args, **kwargs)
    return self.quantize_output(operation, outputs)


def _on_int8_grid(constant):
    """A NumPy constant operand as the TFLite converter stores it: int8 on
    the asymmetric grid of its own min / max (measured: a position encoding
    added as a float constant left 4 % of an ADD's outputs one step off, on
    this grid 0.005 %). Other values are returned as they are."""
    if not isinstance(constant, np.ndarray) or constant.dtype != np.float32:
        return constant
    low, high = float(min(constant.min(), 0.0)), float(max(constant.max(), 0.0))
    return quantizers.fake_quant(constant, low, high, num_bits=8).numpy()


def _place_rounding_operation(self, operation, args, kwargs):
    """`x + 3.0`, `x * y`, `keras.ops.matmul(q, k)`: the operation (a
    constant is in the node, put on the int8 grid the converter stores it
    on), then a FakeQuant (with softmax's fixed range)."""
    outputs = clone(operation)(*(_on_int8_grid(arg) for arg in args), **kwargs)
    return self.quantize_output(operation, outputs, int8_rules.fixed_output_range(operation))


def _place_concatenation(self, layer, args, kwargs):
    """A QuantConcatenate, which quantizes the inputs that have no grid yet."""
    new = self.clones.of(
        layer,
        lambda: QuantConcatenate(
            **layer.get_config(),
            quantize_inputs=[self.unrounded(p) for p in self.graph.producers(layer)],
            quantizer=self.shared_quantizer(layer),
        ),
    )
    return self.apply_quantizer(new, args[0], self.needs_grid(layer))


def _place_score_mask(self, layer, args, kwargs):
    """A QuantAttentionScoreMask: the scores quantized, the excluded ones
    at the bottom of their grid."""
    new = self.clones.of(
        layer,
        lambda: QuantAttentionScoreMask(
            **layer.get_config(),
            quantizer=self.shared_quantizer(layer),
        ),
    )
    return new(*args, **kwargs)


def _is_shared_grid_pooling(self, operation):
    return isinstance(operation, keras.layers.AveragePooling2D) and self.unrounded(
        self.graph.producers(operation)[0]
    )


def _place_shared_grid_pooling(self, layer, args, kwargs):
    """A QuantAveragePooling2D: input and output on one grid."""
    new = self.clones.of(
        layer,
        lambda: QuantAveragePooling2D(
            **layer.get_config(),
            quantizer=self.shared_quantizer(layer),
        ),
    )
    return self.apply_quantizer(new, args[0], self.needs_grid(layer))


def _fuses_activation(layer):
    """Whether the integer kernel fuses `layer`'s activation (or it has none)."""
    name = int8_rules.activation_name(layer.activation)
    return name in ("linear",) + int8_rules.FUSED_ACTIVATIONS


def _quantized_clone(self, layer):
    plain, folded = QUANTIZED_LAYERS[type(layer)]
    config = layer.get_config()
    options = self.weight_options(layer, per_channel=_per_channel_by_default(self, layer))
    learned = self.options.range_learning[0]
    config["weight_quantizer"] = LearnedWeightQuantizer(**options) if learned else options
    if self.options.bn_fold and layer.has_bn:
        plain, config["freeze_bn"] = folded, self.options.freeze_bn
    if not _fuses_activation(layer) or self.moves_activation(layer):
        # Applied after: between two FakeQuants, or by the FakeQuant after it.
        config["activation"] = None
    return plain(**config)


def _per_channel_by_default(self, layer):
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
    return layer.has_bn and not self.options.bn_fold


def _place_fusion(self, layer, args, kwargs):
    """The quantized layer, its FakeQuant and any activation it cannot fuse."""
    new = self.clones.of(layer, lambda: _quantized_clone(self, layer))
    outputs = new(args[0], **self.grid_of(args[0]))
    if _fuses_activation(layer):
        return self.quantize_output(layer, outputs, activation=self.moves_activation(layer))
    outputs = self.fake_quant(layer.name)(outputs)
    name = f"{layer.name}_activation"
    outputs = _activation_layer(self, layer.activation, name)(outputs)
    fixed_range = int8_rules.FIXED_OUTPUT_RANGES.get(int8_rules.activation_name(layer.activation))
    return self.quantize_output(layer, outputs, fixed_range, name=name)


def _activation_layer(self, activation, name):
    """An `Activation` layer, or the layer of an activation that TFLite
    computes as two int8 ops."""
    two_op = TWO_OP_ACTIVATION_LAYERS.get(int8_rules.activation_name(activation))
    if two_op is None:
        return keras.layers.Activation(activation, name=name)
    return two_op(
        num_bits=self.options.num_bits[1], quant_delay=self.options.quant_delay[1], name=name
    )


def _place_rounding_layer(self, layer, args, kwargs):
    """An activation, merge or global pooling layer, then its FakeQuant."""
    is_two_op = isinstance(layer, keras.layers.Activation) and (
        int8_rules.activation_name(layer.activation) in TWO_OP_ACTIVATION_LAYERS
    )
    new = self.clones.of(
        layer,
        (lambda: _activation_layer(self, layer.activation, layer.name)) if is_two_op else None,
    )
    outputs = new(*args, **kwargs)
    return self.quantize_output(layer, outputs, int8_rules.fixed_output_range(layer))


def _moves_into_fake_quant(self, layer):
    """A ReLU / ReLU6 layer with a `FakeQuant` after it: that `FakeQuant`
    applies it (the integer op before it clamps to its grid)."""
    return int8_rules.is_fused_activation(layer) and not self.rounded_by_consumers(layer)


def _place_fused_activation(self, layer, args, kwargs):
    """A `FakeQuant(activation=...)` in place of the activation layer."""
    activation = int8_rules.fused_activation(layer)
    return self.quantize_output(layer, args[0], activation=activation)


def _place_embedding(self, layer, args, kwargs):
    """A QuantEmbedding with the same table, quantized per tensor: its
    output keeps the table's grid (GATHER), so no FakeQuant follows."""
    options = self.weight_options(layer)
    options["per_channel"] = False
    new = self.clones.of(
        layer, lambda: QuantEmbedding(**layer.get_config(), weight_quantizer=options)
    )
    return self.apply_quantizer(new, args[0], self.needs_grid(layer))


def _place_layer_normalization(self, layer, args, kwargs):
    """A QuantLayerNormalization (its intermediate results rounded as
    TFLite's int8 ops round them), then the FakeQuant of its output."""
    calls = self.graph.call_count(layer)
    new = self.clones.of(
        layer,
        lambda: QuantLayerNormalization(
            **dict(layer.get_config(), axis=-1),  # the last axis (checked)
            quantizer=self.activation_options(layer.name, calls),
            weight_quantizer=dict(self.weight_options(layer), per_channel=False),
        ),
    )
    return self.quantize_output(layer, new(args[0]))


def _place_bilinear_resize(self, layer, args, kwargs):
    """A QuantUpSampling2D / QuantResizing: the int8 kernel's rounding onto
    the input's grid, which its output keeps."""
    quantized = QuantUpSampling2D if isinstance(layer, keras.layers.UpSampling2D) else QuantResizing
    new = self.clones.of(layer, lambda: quantized(**layer.get_config()))
    return self.keep_grid(args[0], new(args[0], **self.grid_of(args[0])))


def _place_grid_keeping(self, layer, args, kwargs):
    """Kept as it is; its output lies on its input's grid."""
    return self.keep_grid(args[0], self.clones.of(layer)(*args, **kwargs))


PLACEMENT_RULES = (
    (lambda self, op: self.is_skipped(op), _place_skipped),
    (_casts_integer_input, _place_integer_cast),
    (lambda self, op: isinstance(op, int8_rules.ROUNDING_OPERATIONS), _place_rounding_operation),
    (lambda self, op: isinstance(op, keras.layers.Concatenate), _place_concatenation),
    (lambda self, op: type(op) is AttentionScoreMask, _place_score_mask),
    (_is_shared_grid_pooling, _place_shared_grid_pooling),
    (lambda self, op: isinstance(op, FusionLayer), _place_fusion),
    (_moves_into_fake_quant, _place_fused_activation),
    (lambda self, op: isinstance(op, int8_rules.ROUNDING_LAYERS), _place_rounding_layer),
    (lambda self, op: type(op) is keras.layers.Embedding, _place_embedding),
    (
        lambda self, op: type(op) is keras.layers.LayerNormalization,
        _place_layer_normalization,
    ),
    (lambda self, op: int8_rules.is_bilinear_resize(op), _place_bilinear_resize),
    (lambda self, op: True, _place_grid_keeping),
)
