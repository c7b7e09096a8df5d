"""fuse: a plain Keras model to a fusion network, weights carried over.

Each unit of a future integer op becomes one fusion layer with the same
weights, so the fused network computes what the original computes:

- a `Conv1D`, `Conv2D`, `Conv2DTranspose`, `DepthwiseConv1D`,
  `DepthwiseConv2D` or `Dense`, with the `BatchNormalization` (over the last
  axis) and the activation after it (its own `activation=` argument, or a
  `ReLU`, `ReLU(max_value=6)`, `LeakyReLU` or `Activation` layer), becomes a
  `Conv1DBnAct` / `Conv2DBnAct` / `Conv2DTransposeBnAct` /
  `DepthwiseConv1DBnAct` / `DepthwiseConv2DBnAct` / `DenseBnAct`;
- a `SeparableConv2D` (`SeparableConv1D`) becomes a `DepthwiseConv2DBnAct`
  (`DepthwiseConv1DBnAct`: its depthwise step, no bias) followed by a
  size-1 `Conv2DBnAct` (`Conv1DBnAct`: its pointwise step, bias, BatchNorm
  and activation), as TFLite computes it;
- a per-channel affine layer on 4D inputs (a `BatchNormalization` that no
  conv absorbed, a `Rescaling`, a `Normalization` over the last axis), with
  the activation after it, becomes a 1x1 `DepthwiseConv2DBnAct`: one int8
  DEPTHWISE_CONV_2D with per-channel weights in the integer model. A
  standalone BatchNorm keeps training (kernel of ones, then the BatchNorm);
  `Rescaling` and `Normalization` become fixed weights (`trainable=False`).

A link of a chain is absorbed only when the tensor between them is used by
nothing else and is not a model output. `FUSION_RULES` maps each layer class
to the function that builds its fusion layers.
"""

import keras
import numpy as np

from keras_qat import graph, int8_rules
from keras_qat.layers.activations import LeakyReLUActivation
from keras_qat.layers.conv1d import Conv1DBnAct, DepthwiseConv1DBnAct
from keras_qat.layers.conv2d import Conv2DBnAct, DepthwiseConv2DBnAct
from keras_qat.layers.conv2d_transpose import Conv2DTransposeBnAct
from keras_qat.layers.dense import DenseBnAct
from keras_qat.quantizer_roles import check_float_model
from keras_qat.transforms.clones import Clones
from keras_qat.transforms.inline import inline_nested_models
from keras_qat.transforms.selection import selected_layer_names

L = keras.layers
_LINEAR = (
    L.Conv1D,
    L.Conv2D,
    L.Conv2DTranspose,
    L.Dense,
    L.DepthwiseConv1D,
    L.DepthwiseConv2D,
    L.SeparableConv1D,
    L.SeparableConv2D,
)
_AFFINE = (L.BatchNormalization, L.Rescaling, L.Normalization)
# Config entries of a BatchNormalization that are not a fusion layer's
# BatchNorm arguments (the fusion layer's own, or what never fuses).
_NOT_BN_ARGS = ("name", "trainable", "dtype", "axis", "activity_regularizer")


def _activation_of(layer):
    """The activation an activation layer applies, or None if it is not one."""
    if isinstance(layer, L.Activation):
        return keras.activations.serialize(layer.activation)
    if isinstance(layer, L.ReLU):
        return int8_rules.relu_layer_activation(layer)
    if isinstance(layer, L.LeakyReLU):
        return LeakyReLUActivation(layer.get_config()["negative_slope"])
    return None


def unfusable_reason(layer):
    """Why a Conv2D / Dense / (Separable/Depthwise)Conv2D layer cannot become
    a fusion layer (an attribute and what to do), or None when it can."""
    config = layer.get_config()
    if isinstance(layer, L.Conv2DTranspose) and tuple(config.get("dilation_rate", (1, 1))) != (
        1,
        1,
    ):
        return (
            f"dilation_rate={tuple(config['dilation_rate'])}: TFLite's TRANSPOSE_CONV has no "
            "dilation; keep the layer in float with skip_layers"
        )
    if config.get("data_format") == "channels_first":
        return (
            "data_format='channels_first': TFLite's integer kernels are channels-last; "
            "build the model with data_format='channels_last'"
        )
    return int8_rules.keras_quantization_reason(layer)


def fusable_classes():
    """The Keras layer classes that `fuse` turns into fusion layers."""
    return _LINEAR + _AFFINE


def _is_linear(layer):
    """A Conv2D / DepthwiseConv2D / SeparableConv2D / Dense that fuses."""
    return type(layer) in _LINEAR and unfusable_reason(layer) is None


def _bn_is_fusable(bn, rank):
    """A BatchNorm over the last axis of its `rank`-D input, without renorm."""
    config = bn.get_config()
    axis = config["axis"]
    axis = axis if isinstance(axis, (list, tuple)) else [axis]
    last = len(axis) == 1 and axis[0] in (-1, rank - 1)
    return last and not config.get("renorm", False)


def _is_fusable_bn(layer, graph_view):
    """A BatchNormalization that a linear layer before it can absorb."""
    if not isinstance(layer, L.BatchNormalization):
        return False
    return _bn_is_fusable(layer, len(graph_view.input_tensors(layer)[0].shape))


def _is_affine(layer, graph_view):
    """A per-channel affine layer on 4D channels-last inputs."""
    if not isinstance(layer, _AFFINE):
        return False
    shape = graph_view.input_tensors(layer)[0].shape
    if len(shape) != 4 or shape[-1] is None:
        return False
    if not graph_view.input_tensors(layer)[0].dtype.startswith("float"):
        return False  # an integer model input: the layer casts it, and stays
    if isinstance(layer, L.BatchNormalization):
        return _bn_is_fusable(layer, 4)
    if isinstance(layer, L.Normalization):
        return tuple(layer.axis) in ((-1,), (3,))
    return True


def has_fusable_layers(model):
    """Whether `model` has layers that `fuse` replaces."""
    graph_view = graph.Graph(model)
    return any(_is_linear(op) or _is_affine(op, graph_view) for op in graph_view.operations)


def _absorbs(layer, nxt):
    """Whether `layer` can absorb `nxt` (its only consumer) without changing
    what either does: same trainability and dtype policy, and no activity
    regularizer on either (it would move to the fused output)."""
    return (
        isinstance(nxt, keras.layers.Layer)
        and (nxt.trainable == layer.trainable or not nxt.weights)
        and nxt.dtype_policy.name == layer.dtype_policy.name
        and layer.activity_regularizer is None
        and nxt.activity_regularizer is None
    )


def _plan(graph_view, skipped):
    """Maps id(layer) -> (bn or None, activation layer or None) for every
    layer that becomes fusion layers, and returns the ids of the absorbed
    BatchNorm and activation layers."""
    plan, absorbed = {}, set()

    def only_consumer(layer):
        consumers = graph_view.consumers(layer)
        if graph_view.is_output(layer) or len(consumers) != 1 or consumers[0].name in skipped:
            return None
        return consumers[0] if _absorbs(layer, consumers[0]) else None

    for layer in graph_view.operations:  # in topological order: a conv before its BN
        if id(layer) in absorbed or layer.name in skipped:
            continue
        if not (_is_linear(layer) or _is_affine(layer, graph_view)):
            continue
        bn = activation_layer = None
        last = layer
        if int8_rules.activation_name(getattr(layer, "activation", None)) == "linear":
            nxt = only_consumer(last)
            if _is_linear(layer) and _is_fusable_bn(nxt, graph_view):
                bn = last = nxt
            nxt = only_consumer(last)
            if nxt is not None and _activation_of(nxt) is not None:
                activation_layer = nxt
        plan[id(layer)] = (bn, activation_layer)
        absorbed.update(id(part) for part in (bn, activation_layer) if part is not None)
    return plan, absorbed


def _bn_args(bn):
    """The fusion-layer arguments of a BatchNorm (all of its own)."""
    if bn is None:
        return {}
    config = bn.get_config()
    args = {k: v for k, v in config.items() if k not in _NOT_BN_ARGS and not k.startswith("renorm")}
    return dict(has_bn=True, **args)


def _linear_args(layer, drop=()):
    """A Keras layer's config as fusion-layer arguments: everything it
    carries (trainable, dtype policy, regularizers, constraints, ...) but
    its activation and name, which the fusion rule sets."""
    config = layer.get_config()
    drop = ("name", "activation") + int8_rules.KERAS_QUANTIZATION_ARGUMENTS + drop
    return {key: value for key, value in config.items() if key not in drop}


def _fuse_linear(fusion_class):
    """A rule for a Conv2D / Dense / DepthwiseConv2D: one fusion layer."""

    def rule(layer, bn, activation, channels):
        fused = fusion_class(
            activation=activation, name=layer.name, **_linear_args(layer), **_bn_args(bn)
        )

        def copy_weights():
            fused.linear_layer.set_weights(layer.get_weights())
            if bn is not None:
                fused.bn.set_weights(bn.get_weights())

        return [fused], copy_weights

    return rule


def _fuse_separable(layer, bn, activation, channels):
    """A SeparableConv1D / 2D: its depthwise step, then a pointwise
    (size-1) conv with the bias, BatchNorm and activation (as TFLite
    computes it)."""
    config = layer.get_config()
    common = dict(trainable=config["trainable"], dtype=config["dtype"])
    one_d = isinstance(layer, L.SeparableConv1D)
    depthwise = (DepthwiseConv1DBnAct if one_d else DepthwiseConv2DBnAct)(
        config["kernel_size"],
        strides=config["strides"],
        padding=config["padding"],
        depth_multiplier=config["depth_multiplier"],
        dilation_rate=config["dilation_rate"],
        use_bias=False,
        depthwise_initializer=config["depthwise_initializer"],
        depthwise_regularizer=config["depthwise_regularizer"],
        depthwise_constraint=config["depthwise_constraint"],
        name=f"{layer.name}_depthwise",
        **common,
    )
    pointwise = (Conv1DBnAct if one_d else Conv2DBnAct)(
        config["filters"],
        1,
        use_bias=config["use_bias"],
        activation=activation,
        kernel_initializer=config["pointwise_initializer"],
        kernel_regularizer=config["pointwise_regularizer"],
        kernel_constraint=config["pointwise_constraint"],
        bias_initializer=config["bias_initializer"],
        bias_regularizer=config["bias_regularizer"],
        bias_constraint=config["bias_constraint"],
        activity_regularizer=config["activity_regularizer"],
        name=layer.name,
        **common,
        **_bn_args(bn),
    )

    def copy_weights():
        weights = layer.get_weights()
        depthwise.depthwise.set_weights(weights[:1])
        pointwise.conv.set_weights(weights[1:])
        if bn is not None:
            pointwise.bn.set_weights(bn.get_weights())

    return [depthwise, pointwise], copy_weights


def _fuse_batchnorm(layer, bn, activation, channels):
    """A standalone BatchNorm: a fixed 1x1 depthwise of ones, then the
    BatchNorm (trainable or frozen as it was)."""
    fused = DepthwiseConv2DBnAct(
        1,
        use_bias=False,
        depthwise_initializer="ones",
        linear_trainable=False,
        activation=activation,
        name=layer.name,
        trainable=layer.trainable,
        dtype=layer.dtype_policy,
        activity_regularizer=layer.activity_regularizer,
        **_bn_args(layer),
    )

    def copy_weights():
        fused.depthwise.set_weights([np.ones((1, 1, channels, 1), np.float32)])
        fused.bn.set_weights(layer.get_weights())

    return [fused], copy_weights


def _affine_weights(layer, channels):
    """`(scale, offset)` per channel of a Rescaling or Normalization."""
    if isinstance(layer, L.Rescaling):
        scale, offset = layer.scale, layer.offset
    else:
        mean = np.asarray(layer.mean, np.float32).reshape(-1)
        std = np.maximum(
            np.sqrt(np.asarray(layer.variance, np.float32).reshape(-1)), keras.config.epsilon()
        )
        scale, offset = (std, mean) if layer.invert else (1.0 / std, -mean / std)
    return (
        np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (channels,)),
        np.broadcast_to(np.asarray(offset, np.float32).reshape(-1), (channels,)),
    )


def _fuse_fixed_affine(layer, bn, activation, channels):
    """A Rescaling or Normalization: a fixed 1x1 depthwise with bias."""
    fused = DepthwiseConv2DBnAct(
        1,
        activation=activation,
        trainable=False,
        dtype=layer.dtype_policy,
        activity_regularizer=layer.activity_regularizer,
        name=layer.name,
    )

    def copy_weights():
        scale, offset = _affine_weights(layer, channels)
        fused.depthwise.set_weights([scale.reshape(1, 1, channels, 1), offset])

    return [fused], copy_weights


# Layer class -> rule(layer, bn, activation, input channels) returning
# (fusion layers applied in order, a function copying the weights).
FUSION_RULES = {
    L.Conv1D: _fuse_linear(Conv1DBnAct),
    L.Conv2D: _fuse_linear(Conv2DBnAct),
    L.Conv2DTranspose: _fuse_linear(Conv2DTransposeBnAct),
    L.Dense: _fuse_linear(DenseBnAct),
    L.DepthwiseConv1D: _fuse_linear(DepthwiseConv1DBnAct),
    L.DepthwiseConv2D: _fuse_linear(DepthwiseConv2DBnAct),
    L.SeparableConv1D: _fuse_separable,
    L.SeparableConv2D: _fuse_separable,
    L.BatchNormalization: _fuse_batchnorm,
    L.Rescaling: _fuse_fixed_affine,
    L.Normalization: _fuse_fixed_affine,
}


def _fused_activation(layer, activation_layer):
    if activation_layer is None:
        return getattr(layer, "activation", None)
    return _activation_of(activation_layer)


def fuse(model, skip_layers=None):
    """Returns the fusion network of a plain Keras model.

    Conv1D, Conv2D (channels last), Conv2DTranspose, DepthwiseConv2D,
    SeparableConv2D and Dense layers, with the
    `BatchNormalization` (last axis, with center and scale) and activation
    layer that follow them, become fusion layers with the same weights; so
    do per-channel affine layers on images (a BatchNormalization after no
    conv, `Rescaling`, `Normalization` over the last axis), as 1x1
    `DepthwiseConv2DBnAct` layers (see the module docstring). Other layers
    are kept as they are (their weights too). The result computes what
    `model` computes, to float rounding. Nested models are inlined first
    (see `keras_qat.transforms.inline`).

    Args:
        model: A Sequential or Functional Keras model.
        skip_layers: Layers to keep as they are, neither fused nor absorbed
            into another: names, classes or a predicate `layer -> bool`.

    Returns:
        A new Functional model.

    Raises:
        ValueError: for a model that is neither Sequential nor Functional,
            or an invalid `skip_layers`.

    Example:

    >>> plain = keras.Sequential([keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
    ...     keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(2)])
    >>> [type(layer).__name__ for layer in fuse(plain).layers]
    ['InputLayer', 'Conv2DBnAct', 'Flatten', 'DenseBnAct']
    """
    graph.functional_graph(model)  # a clear error for other models
    check_float_model(model, "fuse")
    model = inline_nested_models(model)
    graph_view = graph.Graph(model)
    plan, absorbed = _plan(graph_view, selected_layer_names(model, skip_layers))
    clones, copy_functions, replacements = Clones(), [], {}

    def call(operation, *args, **kwargs):
        if id(operation) in absorbed:
            return args[0]
        if id(operation) in plan:
            if id(operation) not in replacements:
                replacements[id(operation)] = _replace(operation)
            outputs = args[0]
            for fused in replacements[id(operation)]:
                outputs = fused(outputs, training=kwargs.get("training"))
            return outputs
        return clones.of(operation)(*args, **kwargs)

    def _replace(layer):
        bn, activation_layer = plan[id(layer)]
        channels = graph_view.input_tensors(layer)[0].shape[-1]
        rule = FUSION_RULES[type(layer)]
        layers, copy_weights = rule(layer, bn, _fused_activation(layer, activation_layer), channels)
        copy_functions.append(copy_weights)
        return layers

    fused_model = graph.rebuild(model, call)
    clones.copy_weights()
    for copy_weights in copy_functions:
        copy_weights()
    return fused_model
