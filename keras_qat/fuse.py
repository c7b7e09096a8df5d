"""fuse: a plain Keras model to a fusion network, weights carried over.

Each unit of a future integer op becomes one fusion layer with the same
weights, so the fused network computes what the original computes:

- a `Conv2D`, `DepthwiseConv2D` or `Dense`, with the `BatchNormalization`
  and the activation after it (its own `activation=` argument, or a `ReLU`,
  `ReLU(max_value=6)`, `LeakyReLU` or `Activation` layer), becomes a
  `Conv2DBnAct` / `DepthwiseConv2DBnAct` / `DenseBnAct`;
- a `SeparableConv2D` becomes a `DepthwiseConv2DBnAct` (its depthwise step,
  no bias) followed by a 1x1 `Conv2DBnAct` (its pointwise step, bias,
  BatchNorm and activation), as TFLite computes it;
- a per-channel affine layer on 4D inputs (a `BatchNormalization` that no
  conv absorbed, a `Rescaling`, a `Normalization` over the last axis), with
  the activation after it, becomes a 1x1 `DepthwiseConv2DBnAct`: one int8
  DEPTHWISE_CONV_2D with per-channel weights in the integer model. A
  standalone BatchNorm keeps training (kernel of ones, then the BatchNorm);
  `Rescaling` and `Normalization` become fixed weights (`trainable=False`).

A link of a chain is absorbed only when the tensor between them is used by
nothing else and is not a model output.
"""

import keras
import numpy as np

from keras_qat.config import selected_layer_names
from keras_qat.nested import inline_nested_models
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct, DepthwiseConv2DBnAct

L = keras.layers
_COMMON_ARGS = ("use_bias", "bias_initializer", "bias_regularizer")
# Plain layer -> (fusion layer, the config entries it takes over).
_FUSED = {
    L.Conv2D: (
        Conv2DBnAct,
        _COMMON_ARGS + ("filters", "kernel_size", "strides", "padding",
                        "dilation_rate", "kernel_initializer", "kernel_regularizer"),
    ),
    L.Dense: (
        DenseBnAct,
        _COMMON_ARGS + ("units", "kernel_initializer", "kernel_regularizer"),
    ),
    L.DepthwiseConv2D: (
        DepthwiseConv2DBnAct,
        _COMMON_ARGS + ("kernel_size", "strides", "padding", "depth_multiplier",
                        "dilation_rate", "depthwise_initializer", "depthwise_regularizer"),
    ),
}
_SEPARABLE_ARGS = ("kernel_size", "strides", "padding", "depth_multiplier",
                   "dilation_rate", "depthwise_initializer", "depthwise_regularizer")
_AFFINE = (L.BatchNormalization, L.Rescaling, L.Normalization)


def has_fusable_layers(model):
    """Whether `model` has layers that `fuse` replaces."""
    return any(
        type(layer) in _FUSED or isinstance(layer, (L.SeparableConv2D,) + _AFFINE)
        for layer in model.layers
    )


def _activation_of(layer):
    """The activation an activation layer applies, or None if it is not one."""
    if isinstance(layer, L.Activation):
        return keras.activations.serialize(layer.activation)
    if isinstance(layer, L.ReLU):
        config = layer.get_config()
        if config["negative_slope"] == 0 and config["threshold"] == 0:
            if config["max_value"] is None:
                return "relu"
            if config["max_value"] == 6:
                return "relu6"
    if isinstance(layer, L.LeakyReLU):
        return "leaky_relu"  # its slope is read from the layer when fusing
    return None


def _only_consumer(layer, output_layers):
    """The single layer that consumes `layer`'s output, or None."""
    if layer.name in output_layers or len(layer._outbound_nodes) != 1:
        return None
    return layer._outbound_nodes[0].operation


def _channels_last_4d(layer):
    shape = layer._inbound_nodes[0].input_tensors[0].shape
    return len(shape) == 4 and shape[-1] is not None


def _is_linear(layer):
    """A Conv2D / DepthwiseConv2D / SeparableConv2D / Dense that fuses."""
    if type(layer) not in _FUSED and type(layer) is not L.SeparableConv2D:
        return False
    config = layer.get_config()
    if config.get("groups", 1) != 1 or config.get("data_format", "channels_last") != "channels_last":
        return False
    # A constraint would have to act on the fusion layer's kernel; keep the layer.
    return not any(value for key, value in config.items() if key.endswith("_constraint"))


def _is_affine(layer):
    """A per-channel affine layer on 4D channels-last inputs."""
    if not isinstance(layer, _AFFINE) or not _channels_last_4d(layer):
        return False
    if isinstance(layer, L.BatchNormalization):
        return _bn_is_fusable(layer)
    if isinstance(layer, L.Normalization):
        return tuple(layer.axis) in ((-1,), (3,))
    return True


def _bn_is_fusable(bn):
    config = bn.get_config()
    return config["axis"] in (-1, [-1], 3, [3]) and config["center"] and config["scale"]


def _plan(model, skipped):
    """Maps id(layer) -> (bn or None, activation layer or None) for every
    layer that becomes fusion layers; layers named in `skipped` stay."""
    output_layers = {t._keras_history.operation.name for t in model.outputs}
    plan, absorbed = {}, set()

    def only_consumer(layer):
        consumer = _only_consumer(layer, output_layers)
        return None if consumer is None or consumer.name in skipped else consumer

    for layer in model.layers:  # in topological order: a conv before its BN
        if id(layer) in absorbed or layer.name in skipped:
            continue
        if not (_is_linear(layer) or _is_affine(layer)):
            continue
        bn = activation_layer = None
        last = layer
        own_activation = getattr(layer, "activation", None)
        if own_activation is None or keras.activations.serialize(own_activation) == "linear":
            nxt = only_consumer(last)
            if _is_linear(layer) and isinstance(nxt, L.BatchNormalization) and _bn_is_fusable(nxt):
                bn, last = nxt, nxt
            nxt = only_consumer(last)
            if nxt is not None and _activation_of(nxt) is not None:
                activation_layer = nxt
        plan[id(layer)] = (bn, activation_layer)
        absorbed.update(id(part) for part in (bn, activation_layer) if part is not None)
    return plan, absorbed


def _fused_activation(layer, activation_layer):
    if activation_layer is None:
        return getattr(layer, "activation", None)
    if isinstance(activation_layer, L.LeakyReLU):
        return LeakyReLUActivation(activation_layer.get_config()["negative_slope"])
    return _activation_of(activation_layer)


def _bn_args(bn):
    if bn is None:
        return {}
    config = bn.get_config()
    return dict(has_bn=True, momentum=config["momentum"], epsilon=config["epsilon"],
                synchronized=config.get("synchronized", False))


def _affine_weights(layer, channels):
    """`(scale, offset)` per channel of a Rescaling or Normalization."""
    if isinstance(layer, L.Rescaling):
        scale, offset = layer.scale, layer.offset
    else:
        mean = np.asarray(layer.mean, np.float32).reshape(-1)
        std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float32).reshape(-1)),
                         keras.config.epsilon())
        scale, offset = (std, mean) if layer.invert else (1.0 / std, -mean / std)
    return (np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)),
            np.broadcast_to(np.asarray(offset, np.float32).reshape(-1), (channels,)))


def _fused_layers(layer, bn, activation_layer):
    """Returns `(layers, copy_weights)`: the fusion layers that replace
    `layer` (applied in order) and a function that copies the weights once
    they are built."""
    config = layer.get_config()
    activation = _fused_activation(layer, activation_layer)
    if type(layer) in _FUSED:
        fused_class, args = _FUSED[type(layer)]
        fused = fused_class(activation=activation, name=layer.name,
                            **{key: config[key] for key in args}, **_bn_args(bn))

        def copy_weights():
            fused.linear_layer.set_weights(layer.get_weights())
            if bn is not None:
                fused.bn.set_weights(bn.get_weights())

        return [fused], copy_weights
    if isinstance(layer, L.SeparableConv2D):
        depthwise = DepthwiseConv2DBnAct(
            use_bias=False, name=f"{layer.name}_depthwise",
            **{key: config[key] for key in _SEPARABLE_ARGS})
        pointwise = Conv2DBnAct(
            config["filters"], 1, use_bias=config["use_bias"], activation=activation,
            kernel_initializer=config["pointwise_initializer"],
            kernel_regularizer=config["pointwise_regularizer"],
            bias_initializer=config["bias_initializer"],
            bias_regularizer=config["bias_regularizer"],
            name=layer.name, **_bn_args(bn))

        def copy_weights():
            weights = layer.get_weights()
            depthwise.depthwise.set_weights(weights[:1])
            pointwise.conv.set_weights(weights[1:])
            if bn is not None:
                pointwise.bn.set_weights(bn.get_weights())

        return [depthwise, pointwise], copy_weights
    # A per-channel affine layer: a 1x1 depthwise convolution.
    channels = layer._inbound_nodes[0].input_tensors[0].shape[-1]
    if isinstance(layer, L.BatchNormalization):
        fused = DepthwiseConv2DBnAct(
            1, use_bias=False, depthwise_initializer="ones", activation=activation,
            name=layer.name, **_bn_args(layer))

        def copy_weights():
            fused.depthwise.set_weights([np.ones((1, 1, channels, 1), np.float32)])
            fused.bn.set_weights(layer.get_weights())

        return [fused], copy_weights
    fused = DepthwiseConv2DBnAct(1, activation=activation, trainable=False, name=layer.name)

    def copy_weights():
        scale, offset = _affine_weights(layer, channels)
        fused.depthwise.set_weights([scale.reshape(1, 1, channels, 1), offset])

    return [fused], copy_weights


@keras.saving.register_keras_serializable(package="keras_qat")
class LeakyReLUActivation:
    """A serializable leaky ReLU with a given slope, for fused activations."""

    def __init__(self, negative_slope):
        self.negative_slope = negative_slope

    def __call__(self, x):
        return keras.activations.leaky_relu(x, negative_slope=self.negative_slope)

    def get_config(self):
        return {"negative_slope": self.negative_slope}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def fuse(model, skip_layers=None):
    """Returns the fusion network of a plain Keras model.

    Conv2D (channels last, `groups=1`), DepthwiseConv2D, SeparableConv2D
    and Dense layers without weight constraints, with the
    `BatchNormalization` (last axis, with center and scale) and activation
    layer that follow them, become fusion layers with the same weights; so
    do per-channel affine layers on images (a BatchNormalization after no
    conv, `Rescaling`, `Normalization` over the last axis), as 1x1
    `DepthwiseConv2DBnAct` layers (see the module docstring). Other layers
    are kept as they are (their weights too). The result computes what
    `model` computes, to float rounding. Nested models are inlined first
    (see `keras_qat.nested`).

    Args:
        model: A Sequential or Functional Keras model.
        skip_layers: Layers to keep as they are, neither fused nor absorbed
            into another: names, classes or a predicate `layer -> bool`.

    Returns:
        A new Functional model (or Sequential for a Sequential `model`
        without nested models).

    Raises:
        ValueError: for a model that is neither Sequential nor Functional,
            or an invalid `skip_layers`.

    Example:

    >>> plain = keras.Sequential([keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
    ...     keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(2)])
    >>> [type(layer).__name__ for layer in fuse(plain).layers]
    ['Conv2DBnAct', 'Flatten', 'DenseBnAct']
    """
    if not isinstance(model, keras.Sequential) and not hasattr(model, "_run_through_graph"):
        raise ValueError(
            "`fuse` takes Sequential and Functional models. Received a model of "
            f"class {model.__class__.__name__}."
        )
    model = inline_nested_models(model)
    plan, absorbed = _plan(model, selected_layer_names(model, skip_layers))
    copies = []  # functions that copy weights once the new model is built
    applied_before = {}  # id(fusion layer) -> fusion layers applied before it

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):  # a Keras operation such as `x + 3.0`
            return layer.__class__.from_config(layer.get_config())
        if id(layer) in plan:
            *before, fused = _replace(layer)
            applied_before[id(fused)] = before
            return fused
        if id(layer) in absorbed:
            return layer  # never called: see `call`
        new = layer.__class__.from_config(layer.get_config())
        if layer.weights:
            copies.append(lambda: new.set_weights(layer.get_weights()))
        return new

    def _replace(layer):
        layers, copy_weights = _fused_layers(layer, *plan[id(layer)])
        copies.append(copy_weights)
        return layers

    def call(layer, *args, **kwargs):
        if id(layer) in absorbed:
            return args[0]
        for first in applied_before.get(id(layer), []):
            args = (first(args[0]),) + args[1:]
        if id(layer) in applied_before:  # a fusion layer: takes no `mask`
            kwargs = {key: kwargs[key] for key in ("training",) if key in kwargs}
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        layers = [keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)]
        for layer in model.layers:
            if id(layer) in plan:
                layers += _replace(layer)
            elif id(layer) not in absorbed:
                layers.append(clone(layer))
        fused = keras.Sequential(layers, name=model.name)
    else:
        fused = keras.models.clone_model(model, clone_function=clone, call_function=call)
        if fused.compiled:
            fused = keras.Model(fused.inputs, fused.outputs, name=model.name)
    for copy_weights in copies:
        copy_weights()
    return fused
