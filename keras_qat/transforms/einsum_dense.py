"""decompose_einsum_dense: an `EinsumDense` as the `Dense` layer it is.

An `EinsumDense` whose equation contracts its input's trailing axes with a
kernel and writes new trailing output axes (`"abc,cd->abd"`,
`"abc,cde->abde"`, `"abcd,cde->abe"`, `"...b,bc->...c"`) computes a `Dense`
layer on its input with the contracted axes flattened, whose output is then
reshaped to the new axes. The int8 model computes exactly that: one
FULLY_CONNECTED between RESHAPEs. This transform rewrites each such layer as

    Reshape(prefix + (contracted,)) -> Dense(new) -> Reshape(prefix + new axes)

(each Reshape only where the axes are not already one), with the kernel
transposed and reshaped to `(contracted, new)` and the bias broadcast to the
new axes. The `Dense` keeps the layer's name, activation, weights, regularizers and
constraints; it is then fused and quantized like any `Dense`.

Equations of another form (a kernel axis shared with the output's leading
axes, an input axis summed without the kernel, a bias over the leading
axes), and layers with LoRA or Keras' own quantization, are left as they
are: `convert_quant_network` lists them with the reason.
"""

import math
import string

import keras
import numpy as np

from keras_qat import graph, int8_rules
from keras_qat.transforms.decomposition import Decomposition

L = keras.layers

# Options carried into the Dense (its weights are copied, so initializers
# do not matter). A regularizer or constraint sees the Dense's kernel
# `(contracted, new)` and bias `(new,)`, flattened (and the bias broadcast to
# the new axes): one that depends on their shape (OrthogonalRegularizer, a
# norm constraint over another axis than 0) computes on those shapes.
_CARRIED_OPTIONS = (
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


class _Equation:
    """The axes of an `EinsumDense` equation, as Dense sees them: the
    leading `prefix` axes kept, the trailing `contracted` input axes and the
    trailing `new` output axes."""

    def __init__(self, equation, input_rank):
        inputs, rest = equation.replace(" ", "").split(",")
        self.kernel, output = rest.split("->")
        if "..." in inputs:
            free = [c for c in string.ascii_letters if c not in equation]
            elided = "".join(free[: input_rank - (len(inputs) - 3)])
            inputs, output = inputs.replace("...", elided), output.replace("...", elided)
        self.inputs, self.output = inputs, output
        self.prefix = [c for c in inputs if c in output]
        self.contracted = [c for c in inputs if c not in output]
        self.new = [c for c in output if c not in inputs]

    def problem(self, bias_axes):
        """Why this equation is not a Dense on trailing axes, or None."""
        operands = (self.inputs, self.kernel, self.output)
        if any(len(set(axes)) != len(axes) for axes in operands):
            return "an axis repeated within an operand"
        if self.inputs != "".join(self.prefix + self.contracted) or self.output != "".join(
            self.prefix + self.new
        ):
            return "the contracted and new axes must be the trailing ones"
        if not self.prefix:
            return "no batch axis kept"
        if set(self.kernel) != set(self.contracted + self.new):
            return "the kernel shares an axis with the kept leading axes, or misses one"
        if not self.new or not self.contracted:
            return "no contracted or no new axis"
        if bias_axes and not set(bias_axes) <= set(self.new):
            return f"bias_axes={bias_axes!r} over kept leading axes"
        return None


def _equation(layer):
    return _Equation(layer.get_config()["equation"], len(layer.input.shape))


def unsupported_reason(layer):
    """Why an `EinsumDense` cannot be rewritten as a Dense, or None."""
    config = layer.get_config()
    keras_quantization = int8_rules.keras_quantization_reason(layer)
    if keras_quantization:
        return keras_quantization
    if len(graph.node_arguments(layer)) != 1:
        return "called more than once: not rewritten"
    problem = _equation(layer).problem(config.get("bias_axes"))
    if problem:
        return f"equation {config['equation']!r}: {problem}; not a Dense on trailing axes"
    prefix_shape = layer.input.shape[1 : len(_equation(layer).prefix)]
    if sum(d is None for d in prefix_shape) > 1:
        return "more than one unknown leading dimension besides the batch"
    return None


class _Decomposition:
    """The Reshape / Dense / Reshape of one EinsumDense and its weights."""

    def __init__(self, layer, prefix=None):
        config = layer.get_config()
        self.layer = layer
        self.axes = _equation(layer)
        shape = dict(zip(self.axes.inputs, layer.input.shape))
        shape.update(zip(self.axes.output, layer.output.shape))
        self.kept = [-1 if shape[c] is None else shape[c] for c in self.axes.prefix[1:]]
        self.new_shape = [shape[c] for c in self.axes.new]
        self.contracted_shape = [shape[c] for c in self.axes.contracted]
        name = prefix or layer.name
        self.dense = L.Dense(
            math.prod(self.new_shape),
            activation=config["activation"],
            use_bias=bool(config.get("bias_axes")),
            dtype=layer.dtype_policy,
            trainable=layer.trainable,
            name=name,
            **{key: config[key] for key in _CARRIED_OPTIONS if config.get(key) is not None},
        )
        self.flatten = None
        if len(self.contracted_shape) > 1:
            target = tuple(self.kept) + (math.prod(self.contracted_shape),)
            self.flatten = L.Reshape(target, name=f"{name}_flatten")
        self.unflatten = None
        if len(self.new_shape) > 1:
            self.unflatten = L.Reshape(tuple(self.kept + self.new_shape), name=f"{name}_reshape")

    def __call__(self, inputs, training=None):
        x = inputs if self.flatten is None else self.flatten(inputs)
        x = self.dense(x)
        return x if self.unflatten is None else self.unflatten(x)

    def copy_weights(self):
        layer, axes = self.layer, self.axes
        order = [axes.kernel.index(c) for c in axes.contracted + axes.new]
        kernel = np.transpose(layer.kernel.numpy(), order)
        weights = [kernel.reshape(self.dense.kernel.shape)]
        if self.dense.use_bias:
            # Keras' bias spans the output's axes from its first bias axis
            # on, with size 1 on the others: it broadcasts over the new axes.
            bias = np.broadcast_to(layer.bias.numpy(), self.new_shape)
            weights.append(bias.reshape(self.dense.bias.shape))
        self.dense.set_weights(weights)


DECOMPOSITION = Decomposition(
    L.EinsumDense,
    matches=lambda operation: type(operation) is L.EinsumDense,
    unsupported_reason=unsupported_reason,
    build=_Decomposition,
)


def decompose_einsum_dense(model, skipped=()):
    """Returns `model` with each decomposable `EinsumDense` (not named in
    `skipped`) rewritten as a Dense between reshapes (see the module
    docstring); other layers are cloned with their weights."""
    return DECOMPOSITION.rewrite(model, skipped)
