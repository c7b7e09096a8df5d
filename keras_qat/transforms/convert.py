"""convert_quant_network: a float network to a quantization network.

The path of a model: nested models inlined (`transforms.inline`), layers
without an int8 kernel rewritten as the graph their int8 model computes
(`transforms.support.DECOMPOSITIONS`), plain layers fused
(`transforms.fuse`), every remaining layer checked (`transforms.support`:
one error lists all that cannot be converted), then quantizers placed where
the integer model rounds (`transforms.place`, by the rules of
`transforms.rules`).
"""

from keras_qat import graph
from keras_qat.config import DEFAULT_FREEZE_BN, QuantOptions
from keras_qat.quantizer_roles import check_float_model
from keras_qat.transforms.fuse import fuse, has_fusable_layers
from keras_qat.transforms.inline import inline_nested_models
from keras_qat.transforms.place import Placement
from keras_qat.transforms.selection import layer_selector, selected_layer_names
from keras_qat.transforms.support import DECOMPOSITIONS, check_supported, needs_tracing
from keras_qat.transforms.tracing import trace_layers


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
    - an `AveragePooling1D` / `AveragePooling2D` whose input has no other consumer becomes a
      `QuantAveragePooling1D` / `2D`: input and output share one range and the
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
            started from the first training batch (the fraction of its range
            that rounds it with the least squared error). Default False: min / max
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
    ...     kq.Conv2DBnAct(6, 5, activation="relu"),
    ...     keras.layers.Flatten(),
    ...     kq.DenseBnAct(10),
    ... ])
    >>> qat_model = convert_quant_network(
    ...     model, quant_delay=900, per_channel=[True, False])
    >>> [layer.__class__.__name__ for layer in qat_model.layers]
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
    graph.reserve_names(model)
    kept_in_float = layer_selector(skip_layers)

    def traced(operation):
        return needs_tracing(operation) and not kept_in_float(operation)

    inlined = inline_nested_models(model, keep=traced)
    model = trace_layers(inlined, traced)
    skipped = selected_layer_names(model, skip_layers)
    for decomposition in DECOMPOSITIONS:
        if decomposition.applies_in(model, skipped):
            model = decomposition.rewrite(model, skipped)
    _check_layer_names(inlined, model, skipped, dict(options.layer_num_bits))
    if has_fusable_layers(model):
        # Plain Conv2D / Dense (+ BN, activation), affine layers -> fusion layers.
        model = fuse(model, skip_layers=sorted(skipped))
    check_supported(model, skipped)
    return Placement(options, model, skipped).convert()


def _check_model(model):
    """Raises `ValueError` for a model that cannot be converted at all."""
    graph.functional_graph(model)  # a clear error for subclassed and unbuilt models
    if not model.built or not model.inputs:
        raise ValueError(
            f"Model '{model.name}' has no input shape yet. Start it with "
            "keras.Input(shape) or call it on data before converting it."
        )
    check_float_model(model, "convert_quant_network")


def _check_layer_names(inlined, decomposed, skipped, layer_num_bits):
    """Raises `ValueError` for a `layer_num_bits` key that names no layer of
    the model as it is quantized (after tracing and decompositions:
    `'mha_query'`, not `'mha'`), or a layer that `skip_layers` keeps in
    float."""
    names = [layer.name for layer in decomposed.layers]
    weighted = [layer.name for layer in decomposed.layers if layer.weights]
    invalid = f"Received an invalid value for `layer_num_bits`: model '{inlined.name}'"
    received = f"Received: layer_num_bits={layer_num_bits!r}"
    for name in layer_num_bits:
        if name in skipped:
            raise ValueError(
                f"{invalid} keeps '{name}' in float (`skip_layers`): it has no quantizer for "
                f"a width. Remove it from one of the two. {received}"
            )
        if name in names:
            continue
        rewritten = name in {layer.name for layer in inlined.layers}
        parts = [n for n in weighted if n.startswith(f"{name}_")] if rewritten else []
        if parts:
            raise ValueError(
                f"{invalid} quantizes '{name}' as the layers it is rewritten as: give "
                f"their widths ({', '.join(repr(p) for p in parts)}). {received}"
            )
        raise ValueError(
            f"{invalid} has no layer named {name!r}. Its layers: {', '.join(names)}. {received}"
        )
