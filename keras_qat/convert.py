"""convert_quant_network: a float fusion network to a quantization network.

The converter only decides where things go: fusion layers become their
quantized counterparts (weights copied), a `FakeQuant` follows the model
input and every layer whose output an integer kernel re-quantizes, and
pass-through layers are cloned unchanged. The numerics live in `ops.py` and
the layers.
"""

import keras

from keras_qat.config import QuantConfig
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct
from keras_qat.layers.quant import QuantConv2DBnAct, QuantDenseBnAct

# Float fusion layer -> quantized layer.
QUANTIZED_LAYERS = {
    Conv2DBnAct: QuantConv2DBnAct,
    DenseBnAct: QuantDenseBnAct,
}

# Layers whose output gets a range of its own (a FakeQuant after them): an
# integer kernel computes them and requantizes the result.
REQUANTIZED_LAYERS = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Concatenate,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.Activation,
)

# Layers that move or select values without computing new ones (or, like
# Dropout, are the identity in inference): they are kept as they are.
PASS_THROUGH_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Identity,
)

# Activations that integer kernels fuse into the layer before them.
FUSABLE_ACTIVATIONS = ("relu", "relu6")


def _is_fusable_activation(layer):
    """Whether `layer` is a ReLU / ReLU6 that an integer Add or Mul fuses."""
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        return config["negative_slope"] == 0 and config["threshold"] == 0 and (
            config["max_value"] in (None, 6)
        )
    if isinstance(layer, keras.layers.Activation):
        return keras.activations.serialize(layer.activation) in FUSABLE_ACTIVATIONS
    return False


def _feeds_only_fusable_activations(layer):
    """Whether every consumer of `layer`'s output is a fusable activation."""
    consumers = [node.operation for node in layer._outbound_nodes]
    return bool(consumers) and all(map(_is_fusable_activation, consumers))


def convert_quant_network(
    model,
    bn_fold=False,
    freeze_bn=10_000_000,
    quant_delay=0,
    num_bits=(8, 8),
    per_channel=(False, False),
    symmetric=(False, False),
    narrow_range=(False, False),
):
    """Converts a float fusion network into a quantization network.

    The model is cloned layer by layer. `Conv2DBnAct` and `DenseBnAct`
    become `QuantConv2DBnAct` and `QuantDenseBnAct` with the original's
    weights (so a trained float model converts without retraining), and a
    `FakeQuant` layer follows the model input, each quantized layer's output
    (after its activation), each `Add`, `Subtract`, `Multiply` and
    `Concatenate`, and each standalone `ReLU`, `LeakyReLU` and `Activation`.
    A merge layer whose output only feeds a ReLU or ReLU6 gets no
    `FakeQuant` of its own: integer kernels fuse that activation into the
    merge and round once, after it. Pooling, flatten, reshape, dropout, padding and cropping
    layers are kept. Layer names are kept; a `FakeQuant` is named after the
    layer it follows, plus `_quant`.

    Every quantization option is a `(weights, activations)` pair, as in
    MindSpore's `convert_quant_network`; a single value applies to both.

    Args:
        model: A Sequential or Functional Keras model built from fusion
            layers and the pass-through layers above. Sequential models
            must be built (have an input shape).
        bn_fold: Whether to fold BatchNorm into the weights during training.
            Not implemented yet: `True` raises `NotImplementedError`.
        freeze_bn: Training step from which folded BatchNorm statistics are
            frozen (used with `bn_fold=True`).
        quant_delay: Number of training steps before quantization starts;
            an integer >= 0 or a (weights, activations) pair.
        num_bits: Bit widths, integers in `[2, 16]`.
        per_channel: Per-channel ranges. Only weights may be per channel:
            `per_channel=[True, False]`.
        symmetric: Symmetric ranges.
        narrow_range: Grids `[1, 2**b - 1]` instead of `[0, 2**b - 1]`.

    Returns:
        A new, uncompiled Keras model of the same kind (Sequential or
        Functional) as `model`. `model` is left unchanged.

    Raises:
        ValueError: for an invalid option (the message names it), for a
            model that is not Sequential or Functional, for an unbuilt
            Sequential model, or for layers that cannot be quantized (all of
            them are listed, with their classes).
        NotImplementedError: for `bn_fold=True`.

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
    if config.bn_fold:
        raise NotImplementedError(
            "`bn_fold=True` is not implemented yet; use bn_fold=False "
            "(fake-quantized weights followed by an ordinary BatchNorm)."
        )
    if isinstance(model, keras.Sequential):
        _check_layers(model)
        return _SequentialConverter(config).convert(model)
    if _is_functional(model):
        _check_layers(model)
        return _FunctionalConverter(config).convert(model)
    raise ValueError(
        "`convert_quant_network` converts Sequential and Functional models "
        "only, since it needs the model's graph of layers. Received a model "
        f"of class {model.__class__.__name__}. Rebuild it as a Functional "
        "model (keras.Model(inputs, outputs)) from the same layers."
    )


def _is_functional(model):
    return isinstance(model, keras.Model) and hasattr(model, "_run_through_graph")


def _check_layers(model):
    """Raises one `ValueError` listing every layer that cannot be converted."""
    unsupported = [
        f"'{layer.name}' ({layer.__class__.__name__})"
        for layer in model.layers
        if type(layer) not in QUANTIZED_LAYERS
        and not isinstance(layer, REQUANTIZED_LAYERS + PASS_THROUGH_LAYERS)
    ]
    if unsupported:
        raise ValueError(
            "`convert_quant_network` cannot quantize these layers of model "
            f"'{model.name}': {', '.join(unsupported)}. Build the model from "
            "Conv2DBnAct / DenseBnAct fusion layers (they replace Conv2D and "
            "Dense with their BatchNormalization and activation), merge "
            "layers (Add, Subtract, Multiply, Concatenate), activation layers "
            "(ReLU, LeakyReLU, Activation) and pass-through "
            "layers (" + ", ".join(c.__name__ for c in PASS_THROUGH_LAYERS)
            + ")."
        )


class _Converter:
    """What both model kinds share: the layer mapping and the weight copy."""

    def __init__(self, config):
        self.config = config
        self.copies = []  # (float layer, quantized layer), copied when built.
        self.fused_into_activation = set()  # names of merges quantized after their ReLU

    def clone_layer(self, layer):
        if isinstance(layer, REQUANTIZED_LAYERS) and _feeds_only_fusable_activations(layer):
            self.fused_into_activation.add(layer.name)
        quantized_class = QUANTIZED_LAYERS.get(type(layer))
        if quantized_class is not None:
            clone = quantized_class.from_float(
                layer, **self.config.weight_options()
            )
            self.copies.append((layer, clone))
            return clone
        return layer.__class__.from_config(layer.get_config())

    def fake_quant(self, name):
        return FakeQuant(
            name=f"{name}_quant", **self.config.activation_options()
        )

    def needs_fake_quant(self, clone):
        if clone.name in self.fused_into_activation:
            return False
        return isinstance(
            clone, tuple(QUANTIZED_LAYERS.values()) + REQUANTIZED_LAYERS
        )

    def copy_weights(self):
        for layer, clone in self.copies:
            clone.copy_weights_from(layer)


class _SequentialConverter(_Converter):
    def convert(self, model):
        if not model.built or not model.inputs:
            raise ValueError(
                f"Sequential model '{model.name}' has no input shape yet. "
                "Start it with keras.Input(shape) or call it on data before "
                "converting it."
            )
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
            layers.append(clone)
            if self.needs_fake_quant(clone):
                layers.append(self.fake_quant(layer.name))
        new_model = keras.Sequential(layers, name=model.name)
        self.copy_weights()
        return new_model


class _FunctionalConverter(_Converter):
    def __init__(self, config):
        super().__init__(config)
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
        if self.needs_fake_quant(layer):
            outputs = self.fake_quant(layer.name)(outputs)
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
