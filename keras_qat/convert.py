"""convert_quant_network: a float fusion network to a quantization network.

The converter only decides where things go: fusion layers become their
quantized counterparts (weights copied), a `FakeQuant` follows the model
input and every layer whose output an integer kernel re-quantizes, and
pass-through layers are cloned unchanged. The numerics live in `ops.py` and
the layers.
"""

import keras

# Keras' arithmetic operations on KerasTensors (`x + 3.0`, `x * y`): they
# are graph nodes without being layers. keras.ops exposes only the
# functions, so the classes come from Keras' source package.
from keras.src.ops import numpy as keras_numpy_ops

from keras_qat.config import QuantConfig, selected_layer_names
from keras_qat.fuse import fuse, has_fusable_layers
from keras_qat.nested import inline_nested_models
from keras_qat.layers.bn_fold import (
    QuantConv2DBnFoldAct,
    QuantDenseBnFoldAct,
    QuantDepthwiseConv2DBnFoldAct,
)
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.input_grid import GRID_PRESERVING_LAYERS
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct, DepthwiseConv2DBnAct
from keras_qat.layers.quant import (
    QuantAveragePooling2D,
    QuantConcatenate,
    QuantConv2DBnAct,
    QuantDenseBnAct,
    QuantDepthwiseConv2DBnAct,
    QuantHardSigmoid,
    QuantSwish,
)

# Float fusion layer -> quantized layer, and with its BatchNorm folded.
QUANTIZED_LAYERS = {
    Conv2DBnAct: QuantConv2DBnAct,
    DenseBnAct: QuantDenseBnAct,
    DepthwiseConv2DBnAct: QuantDepthwiseConv2DBnAct,
}
FOLDED_LAYERS = {
    Conv2DBnAct: QuantConv2DBnFoldAct,
    DenseBnAct: QuantDenseBnFoldAct,
    DepthwiseConv2DBnAct: QuantDepthwiseConv2DBnFoldAct,
}

# Layers whose output gets a range of its own (a FakeQuant after them): an
# integer kernel computes them and requantizes the result.
REQUANTIZED_LAYERS = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.Activation,
    keras.layers.Softmax,
    keras.layers.GlobalAveragePooling2D,
)

# Operations (not layers) whose output an integer kernel requantizes.
REQUANTIZED_OPS = (
    keras_numpy_ops.Add,
    keras_numpy_ops.Subtract,
    keras_numpy_ops.Multiply,
)

# Layers that move or select values without computing new ones (or, like
# Dropout, are the identity in inference): they are kept as they are.
PASS_THROUGH_LAYERS = (keras.layers.InputLayer,) + GRID_PRESERVING_LAYERS

# Activations that integer kernels fuse into the layer before them.
FUSABLE_ACTIVATIONS = ("relu", "relu6")

# Activations that TFLite computes as two int8 ops, with a rounding in
# between that these layers simulate.
DECOMPOSED_ACTIVATIONS = {
    "hard_sigmoid": QuantHardSigmoid,  # ADD with fused ReLU6, MUL
    "silu": QuantSwish,  # LOGISTIC, MUL (also "swish")
}

# Outputs whose range TFLite's int8 kernels fix: sigmoid and softmax have
# scale 1/256 and zero point -128, tanh scale 1/128 and zero point 0; hard
# sigmoid's is [0, 1] by construction.
FIXED_OUTPUT_RANGES = {
    "hard_sigmoid": (0.0, 1.0),  # relu6(x + 3) * (1 / 6): see QuantHardSigmoid
    "sigmoid": (0.0, 255 / 256),
    "softmax": (0.0, 255 / 256),
    "tanh": (-1.0, 127 / 128),
}


def convert_quant_network(
    model,
    bn_fold=True,
    freeze_bn=10_000_000,
    quant_delay=0,
    num_bits=(8, 8),
    per_channel=(False, False),
    symmetric=(False, False),
    narrow_range=(False, False),
    skip_layers=None,
):
    """Converts a float fusion network into a quantization network.

    The model is cloned layer by layer. `Conv2DBnAct`,
    `DepthwiseConv2DBnAct` and `DenseBnAct` become their `Quant...`
    counterparts with the original's weights (so a trained float model
    converts without retraining). A `FakeQuant` layer follows wherever an
    integer kernel rounds its result:

    - the model input, and each quantized layer's output (after its
      activation when that is None, ReLU or ReLU6, which integer kernels
      fuse; any other activation becomes an `Activation` layer between two
      `FakeQuant`s, so that the activation's input is quantized too);
    - each `Add`, `Subtract`, `Multiply`, `GlobalAveragePooling2D`, and each
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

    Max pooling, flatten, reshape, dropout, padding and cropping layers are
    kept as they are. Layer names are kept; a `FakeQuant` is named after the
    layer it follows, plus `_quant`. With `bn_fold=True`, fusion layers with
    `has_bn=True` become the `Quant...BnFoldAct` layers instead.

    Every quantization option is a `(weights, activations)` pair, as in
    MindSpore's `convert_quant_network`; a single value applies to both.

    Nested models (a Functional or Sequential model used as a layer) are
    inlined first (`keras_qat.nested.inline_nested_models`), so the result
    is one flat Functional model. Then a plain model is fused
    (`keras_qat.fuse`): each `Conv2D` / `DepthwiseConv2D` /
    `SeparableConv2D` / `Dense` with the `BatchNormalization` and activation
    after it, and each per-channel affine layer on images (BatchNorm after
    no conv, `Rescaling`, `Normalization`), becomes fusion layers with the
    same weights.

    Args:
        model: A Sequential or Functional Keras model built from fusion
            layers or the plain layers above (fused first), possibly with
            nested models. It must be built (have an input shape).
        bn_fold: Whether a fusion layer's BatchNorm is folded into its
            weights (`QuantConv2DBnFoldAct`, `QuantDenseBnFoldAct`): the
            fake-quantized weights are then exactly the deployed ones. With
            `False`, the raw weights are fake-quantized and an ordinary
            BatchNorm follows (what TFLite folds later, exactly only for
            per-channel weights). Default `True`, as in MindSpore.
        freeze_bn: Training step from which folded BatchNorm statistics are
            frozen (with `bn_fold=True`).
        quant_delay: Number of training steps before quantization starts;
            an integer >= 0 or a (weights, activations) pair.
        num_bits: Bit widths, integers in `[2, 16]`.
        per_channel: Per-channel ranges. Only weights may be per channel:
            `per_channel=[True, False]`.
        symmetric: Symmetric ranges.
        narrow_range: Grids `[1, 2**b - 1]` instead of `[0, 2**b - 1]`.
        skip_layers: Layers to leave in float, neither fused nor quantized:
            layer names, layer classes, or a predicate `layer -> bool` (or
            a list of them), matched after nested models are inlined. A
            `FakeQuant` follows a skipped layer whose result a quantized
            layer uses. `export_tflite` then needs `allow_float_ops=True`.

    Returns:
        A new, uncompiled Keras model: Sequential for a Sequential `model`
        without nested models, else Functional. `model` is left unchanged.

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
    ['FakeQuant', 'QuantConv2DBnAct', 'FakeQuant', 'Flatten',
     'QuantDenseBnAct', 'FakeQuant']
    """
    config = QuantConfig.from_args(
        num_bits=num_bits,
        per_channel=per_channel,
        symmetric=symmetric,
        narrow_range=narrow_range,
        quant_delay=quant_delay,
        bn_fold=bn_fold,
        freeze_bn=freeze_bn,
    )
    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        raise ValueError(
            "`convert_quant_network` converts Sequential and Functional models "
            "only, since it needs the model's graph of layers. Received a model "
            f"of class {model.__class__.__name__}. Rebuild it as a Functional "
            "model (keras.Model(inputs, outputs)) from the same layers."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"Model '{model.name}' has no input shape yet. Start it with "
            "keras.Input(shape) or call it on data before converting it."
        )
    model = inline_nested_models(model)
    skipped = selected_layer_names(model, skip_layers)
    if has_fusable_layers(model):
        # Plain Conv2D / Dense (+ BN, activation), affine layers -> fusion layers.
        model = fuse(model, skip_layers=sorted(skipped))
    _check_layers(model, skipped)
    if isinstance(model, keras.Sequential):
        return _SequentialConverter(config, model, skipped).convert(model)
    return _FunctionalConverter(config, model, skipped).convert(model)


def _is_functional(model):
    return isinstance(model, keras.Model) and hasattr(model, "_run_through_graph")


def _check_layers(model, skipped):
    """Raises one `ValueError` listing every layer that cannot be converted."""
    unsupported = [
        f"'{layer.name}' ({layer.__class__.__name__})"
        for layer in model.layers
        if layer.name not in skipped
        and type(layer) not in QUANTIZED_LAYERS
        and not isinstance(
            layer, REQUANTIZED_LAYERS + PASS_THROUGH_LAYERS + (keras.layers.Concatenate,)
        )
    ]
    unsupported += [
        f"'{op.name}' (Keras operation {op.__class__.__name__})"
        for op in getattr(model, "operations", [])
        if not isinstance(op, keras.layers.Layer) and not isinstance(op, REQUANTIZED_OPS)
    ]
    if unsupported:
        raise ValueError(
            "`convert_quant_network` cannot quantize these layers of model "
            f"'{model.name}': {', '.join(unsupported)}. Supported: Conv2D / "
            "DepthwiseConv2D / SeparableConv2D / Dense with the "
            "BatchNormalization and activation after them, BatchNormalization, "
            "Rescaling and Normalization (last axis) on 4D inputs, the fusion "
            "layers, merge layers (Add, Subtract, Multiply, Concatenate), "
            "GlobalAveragePooling2D, activation layers (ReLU, LeakyReLU, "
            "Activation, Softmax), the Keras operations +, - and * between "
            "tensors or with constants, and pass-through "
            "layers (" + ", ".join(c.__name__ for c in PASS_THROUGH_LAYERS)
            + "). To keep layers in float, pass them to `skip_layers` (names, "
            "classes or a predicate)."
        )


def _activation_name(activation):
    """The activation's registered name, or the class name of an activation
    object (never None, which means "no activation")."""
    name = keras.activations.serialize(activation)
    return name if isinstance(name, str) else type(activation).__name__


def _is_fusable_activation(layer):
    """Whether `layer` is a ReLU / ReLU6 that an integer Add or Mul fuses."""
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        return config["negative_slope"] == 0 and config["threshold"] == 0 and (
            config["max_value"] in (None, 6)
        )
    if isinstance(layer, keras.layers.Activation):
        return _activation_name(layer.activation) in FUSABLE_ACTIVATIONS
    return False


def _absorbs_rounding(consumer):
    """Whether `consumer` writes its input's integer result on its own grid.

    TFLite fuses a ReLU / ReLU6 into the op before it, makes every input of
    a CONCATENATION use the concatenation's scale, and gives an
    AVERAGE_POOL_2D's input its output's scale: in all three cases the
    producing op rounds once, to the consumer's grid.
    """
    return _is_fusable_activation(consumer) or isinstance(
        consumer, (keras.layers.Concatenate, keras.layers.AveragePooling2D)
    )


def _producers(layer):
    """The layers whose outputs `layer` consumes, in input order."""
    node = layer._inbound_nodes[0]
    return [t._keras_history.operation for t in node.input_tensors]


def _output_layer_names(model):
    return {t._keras_history.operation.name for t in model.outputs}


class _Converter:
    """What both model kinds share: which layers replace and follow a layer.

    `clone_layer(layer)` returns the layer that takes `layer`'s place, and
    `follow_ups(clone)` the layers applied to its output, in order (FakeQuant
    layers, and the activation of a fusion layer whose activation integer
    kernels cannot fuse).
    """

    def __init__(self, config, model, skipped=()):
        self.config = config
        self.skipped = set(skipped)
        self.names = {layer.name for layer in model.layers}
        self.output_layers = _output_layer_names(model)
        self.copies = []  # (float layer, quantized layer), copied when built.
        self._follow_ups = {}  # id(clone) -> layers applied after it

    def fake_quant_dropped(self, layer):
        """Whether `layer` would end in a FakeQuant that its consumers make
        unnecessary (so its output is not yet quantized)."""
        rounds = (
            type(layer) in QUANTIZED_LAYERS
            or isinstance(layer, REQUANTIZED_LAYERS + REQUANTIZED_OPS)
            or layer.name in self.skipped  # a float result
        )
        return rounds and self.rounded_by_consumers(layer)

    def rounded_by_consumers(self, layer):
        """Whether every consumer of `layer` rounds `layer`'s result itself."""
        consumers = [node.operation for node in layer._outbound_nodes]
        return (
            bool(consumers)
            and layer.name not in self.output_layers
            and all(
                consumer.name not in self.skipped and _absorbs_rounding(consumer)
                for consumer in consumers
            )
        )

    def clone_skipped(self, layer):
        """A float copy of a skipped layer, quantized after it when a
        quantized layer uses its result."""
        clone = layer.__class__.from_config(layer.get_config())
        self.copies.append((layer, clone))
        consumers = [node.operation for node in layer._outbound_nodes]
        if any(consumer.name not in self.skipped for consumer in consumers):
            self._follow_ups[id(clone)] = self.unless_rounded_later(
                layer, [self.fake_quant(layer.name)]
            )
        return clone

    def clone_layer(self, layer):
        if isinstance(layer, REQUANTIZED_OPS):  # its constant operand is in the node
            clone = layer.__class__.from_config(layer.get_config())
            self._follow_ups[id(clone)] = self.unless_rounded_later(
                layer, [self.fake_quant(layer.name)]
            )
            return clone
        if layer.name in self.skipped:
            return self.clone_skipped(layer)
        if isinstance(layer, keras.layers.Concatenate):
            # Quantizes with its own range: nothing follows it.
            return QuantConcatenate(
                **layer.get_config(),
                quantize_inputs=[
                    self.fake_quant_dropped(producer)
                    for producer in _producers(layer)
                ],
                **self.config.activation_options(),
            )
        if isinstance(layer, keras.layers.AveragePooling2D) and self.fake_quant_dropped(
            _producers(layer)[0]
        ):  # Rounds its input and output to one grid: nothing follows it.
            return QuantAveragePooling2D(
                **layer.get_config(), **self.config.activation_options()
            )
        quantized_class = QUANTIZED_LAYERS.get(type(layer))
        options = self.config.weight_options()
        if quantized_class is not None and self.config.bn_fold and layer.has_bn:
            quantized_class = FOLDED_LAYERS[type(layer)]
            options["freeze_bn"] = self.config.freeze_bn
        if quantized_class is None:
            if isinstance(layer, keras.layers.Activation) and (
                _activation_name(layer.activation) in DECOMPOSED_ACTIVATIONS
            ):
                clone = self.activation_layer(layer.activation, layer.name)
            else:
                clone = layer.__class__.from_config(layer.get_config())
            if isinstance(layer, REQUANTIZED_LAYERS):
                self._follow_ups[id(clone)] = self.unless_rounded_later(
                    layer, [self.fake_quant(layer.name, _fixed_range_of(layer))]
                )
            return clone
        activation = _activation_name(layer.activation)
        fused = activation in (None, "linear") + FUSABLE_ACTIVATIONS
        config = layer.get_config()
        if not fused:  # quantize before and after the activation
            config["activation"] = None
        clone = quantized_class(**config, **options)
        self.copies.append((layer, clone))
        follow_ups = [self.fake_quant(layer.name)]
        if not fused:
            follow_ups += [
                self.activation_layer(layer.activation, f"{layer.name}_activation"),
                self.fake_quant(
                    f"{layer.name}_activation",
                    FIXED_OUTPUT_RANGES.get(activation),
                ),
            ]
        self._follow_ups[id(clone)] = self.unless_rounded_later(layer, follow_ups)
        return clone

    def activation_layer(self, activation, name):
        """An `Activation` layer applying `activation`, or the layer of
        `DECOMPOSED_ACTIVATIONS` for an activation that TFLite computes as
        two int8 ops."""
        decomposed = DECOMPOSED_ACTIVATIONS.get(_activation_name(activation))
        if decomposed is not None:
            return decomposed(
                num_bits=self.config.num_bits[1],
                quant_delay=self.config.quant_delay[1],
                name=name,
            )
        return keras.layers.Activation(activation, name=name)

    def unless_rounded_later(self, layer, follow_ups):
        """`follow_ups` without its last FakeQuant when consumers round.

        A fixed range (sigmoid, tanh) is kept: the integer kernel's output
        has that range whatever comes next.
        """
        if follow_ups[-1].fixed_range is None and self.rounded_by_consumers(layer):
            return follow_ups[:-1]
        return follow_ups

    def follow_ups(self, clone):
        return self._follow_ups.get(id(clone), [])

    def fake_quant(self, name, fixed_range=None):
        # Keras operations may share a name with a layer ("add").
        base = candidate = f"{name}_quant"
        suffix = 1
        while candidate in self.names:
            suffix += 1
            candidate = f"{base}_{suffix}"
        self.names.add(candidate)
        return FakeQuant(
            name=candidate,
            fixed_range=fixed_range,
            **self.config.activation_options(),
        )

    def copy_weights(self):
        for layer, clone in self.copies:
            if hasattr(clone, "copy_weights_from"):
                clone.copy_weights_from(layer)
            elif layer.weights:
                clone.set_weights(layer.get_weights())


def _fixed_range_of(layer):
    if isinstance(layer, keras.layers.Activation):
        return FIXED_OUTPUT_RANGES.get(_activation_name(layer.activation))
    if isinstance(layer, keras.layers.Softmax):
        return FIXED_OUTPUT_RANGES["softmax"]
    return None


class _SequentialConverter(_Converter):
    def convert(self, model):
        source = model.inputs[0]
        input_name = source._keras_history.operation.name
        layers = [
            keras.Input(
                batch_shape=source.shape, dtype=source.dtype, name=input_name
            ),
            self.fake_quant(input_name),
        ]
        for layer in model.layers:
            clone = self.clone_layer(layer)
            layers += [clone] + self.follow_ups(clone)
        new_model = keras.Sequential(layers, name=model.name)
        self.copy_weights()
        return new_model


class _FunctionalConverter(_Converter):
    def __init__(self, config, model, skipped=()):
        super().__init__(config, model, skipped)
        self.quantized_inputs = {}  # id(model input) -> its FakeQuant output

    def quantize_input(self, tensor):
        """The FakeQuant output of a model input; other tensors unchanged."""
        history = getattr(tensor, "_keras_history", None)
        if history is None or not isinstance(
            history.operation, keras.layers.InputLayer
        ):
            return tensor
        if id(tensor) not in self.quantized_inputs:
            fake_quant = self.fake_quant(history.operation.name)
            self.quantized_inputs[id(tensor)] = fake_quant(tensor)
        return self.quantized_inputs[id(tensor)]

    def call_layer(self, layer, *args, **kwargs):
        args, kwargs = keras.tree.map_structure(
            self.quantize_input, (args, kwargs)
        )
        outputs = layer(*args, **kwargs)
        for follow_up in self.follow_ups(layer):
            outputs = follow_up(outputs)
        return outputs

    def convert(self, model):
        new_model = keras.models.clone_model(
            model, clone_function=self.clone_layer, call_function=self.call_layer
        )
        if new_model.compiled:  # clone_model compiles like the original.
            new_model = keras.Model(
                new_model.inputs, new_model.outputs, name=model.name
            )
        self.copy_weights()
        return new_model
