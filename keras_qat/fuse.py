"""fuse: a plain Keras model to a fusion network, weights carried over.

A `Conv2D` or `Dense` followed by a `BatchNormalization` and/or an
activation (its own `activation=` argument, or a `ReLU`, `ReLU(max_value=6)`,
`LeakyReLU` or `Activation` layer) becomes one `Conv2DBnAct` / `DenseBnAct`
with the same weights, so the fused network computes what the original
computes. A link of the chain is absorbed only when the tensor between them
is used by nothing else and is not a model output.
"""

import keras

from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct

_FUSED_CLASS = {keras.layers.Conv2D: Conv2DBnAct, keras.layers.Dense: DenseBnAct}
_CONV_ARGS = ("filters", "kernel_size", "strides", "padding", "dilation_rate")


def _activation_of(layer):
    """The activation an activation layer applies, or None if it is not one."""
    if isinstance(layer, keras.layers.Activation):
        return keras.activations.serialize(layer.activation)
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        if config["negative_slope"] == 0 and config["threshold"] == 0:
            if config["max_value"] is None:
                return "relu"
            if config["max_value"] == 6:
                return "relu6"
    if isinstance(layer, keras.layers.LeakyReLU):
        return "leaky_relu"  # its slope is read from the layer when fusing
    return None


def _only_consumer(layer, output_layers):
    """The single layer that consumes `layer`'s output, or None."""
    if layer.name in output_layers or len(layer._outbound_nodes) != 1:
        return None
    return layer._outbound_nodes[0].operation


def _linear_is_fusable(layer):
    if type(layer) not in _FUSED_CLASS:
        return False
    config = layer.get_config()
    if isinstance(layer, keras.layers.Conv2D):
        return config.get("groups", 1) == 1 and config["data_format"] == "channels_last"
    return True


def _plan(model):
    """Maps id(linear layer) -> (bn or None, activation layer or None)."""
    output_layers = {t._keras_history.operation.name for t in model.outputs}
    plan = {}
    for layer in model.layers:
        if not _linear_is_fusable(layer):
            continue
        bn = activation_layer = None
        own_activation = keras.activations.serialize(layer.activation)
        last = layer
        if own_activation == "linear":
            nxt = _only_consumer(last, output_layers)
            if isinstance(nxt, keras.layers.BatchNormalization) and _bn_is_fusable(nxt):
                bn, last = nxt, nxt
            nxt = _only_consumer(last, output_layers)
            if nxt is not None and _activation_of(nxt) is not None:
                activation_layer = nxt
        plan[id(layer)] = (bn, activation_layer)
    return plan


def _bn_is_fusable(bn):
    config = bn.get_config()
    return config["axis"] in (-1, [-1]) and config["center"] and config["scale"]


def _fused_layer(layer, bn, activation_layer):
    config = layer.get_config()
    kwargs = {key: config[key] for key in ("use_bias", "kernel_initializer", "bias_initializer",
                                           "kernel_regularizer", "bias_regularizer")}
    if isinstance(layer, keras.layers.Conv2D):
        kwargs.update({key: config[key] for key in _CONV_ARGS})
    else:
        kwargs["units"] = config["units"]
    activation = layer.activation
    if activation_layer is not None:
        if isinstance(activation_layer, keras.layers.LeakyReLU):
            activation = LeakyReLUActivation(activation_layer.get_config()["negative_slope"])
        else:
            activation = _activation_of(activation_layer)
    if bn is not None:
        bn_config = bn.get_config()
        kwargs.update(has_bn=True, momentum=bn_config["momentum"], epsilon=bn_config["epsilon"],
                      synchronized=bn_config.get("synchronized", False))
    return _FUSED_CLASS[type(layer)](activation=activation, name=layer.name, **kwargs)


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


def fuse(model):
    """Returns the fusion network of a plain Keras model.

    Each `Conv2D` (channels last, `groups=1`) or `Dense`, with the
    `BatchNormalization` (last axis, with center and scale) and activation
    layer that follow it, becomes a `Conv2DBnAct` / `DenseBnAct` with the
    same weights. Other layers are kept as they are (their weights too).
    The result computes what `model` computes, to float rounding.

    Args:
        model: A Sequential or Functional Keras model.

    Returns:
        A new Functional model (or Sequential for a Sequential `model`).

    Raises:
        ValueError: for a model that is neither Sequential nor Functional.

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
    plan = _plan(model)
    absorbed = {}  # id(bn or activation layer) -> True
    for bn, activation_layer in plan.values():
        for part in (bn, activation_layer):
            if part is not None:
                absorbed[id(part)] = True
    copies = []

    def clone(layer):
        if id(layer) in plan:
            fused = _fused_layer(layer, *plan[id(layer)])
            copies.append((layer, plan[id(layer)][0], fused))
            return fused
        if id(layer) in absorbed:
            return layer  # never called: see `call`
        new = layer.__class__.from_config(layer.get_config())
        copies.append((layer, None, new))
        return new

    def call(layer, *args, **kwargs):
        if id(layer) in absorbed:
            return args[0]
        return layer(*args, **kwargs)

    if isinstance(model, keras.Sequential):
        layers = [keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)]
        layers += [clone(layer) for layer in model.layers if id(layer) not in absorbed]
        fused = keras.Sequential(layers, name=model.name)
    else:
        fused = keras.models.clone_model(model, clone_function=clone, call_function=call)
        if fused.compiled:
            fused = keras.Model(fused.inputs, fused.outputs, name=model.name)
    for source, bn, target in copies:
        if isinstance(target, (Conv2DBnAct, DenseBnAct)) and type(source) in _FUSED_CLASS:
            target.linear_layer.set_weights(source.get_weights())
            if bn is not None:
                target.bn.set_weights(bn.get_weights())
        elif source.weights:
            target.set_weights(source.get_weights())
    return fused
