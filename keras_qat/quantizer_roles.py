"""The quantizer contract: a quantizing layer says what it quantizes.

Every keras-qat layer that quantizes answers `quantizers()` with
`{role: quantizer}`, and a layer with weight roles answers
`quantized_weights()` with `{role: float32 tensor}`, the weights each of
those quantizers quantizes (a folded layer's folded kernel). A role is its
kind, optionally followed by `/` and a name:

- `"weights/<name>"`: a `WeightQuantizer` of the layer's weights (a kernel,
  an embedding table, a layer norm's `gamma` and `beta`);
- `"output"`: the `FakeQuant` of the layer's output grid (a `FakeQuant`
  itself, or the shared range of a concatenation, an average pooling, an
  attention mask);
- `"intermediate"` (`"intermediate/<name>"`): a `FakeQuant` of a result
  inside the layer that an int8 op of its own rounds (the first op of a
  two-op activation, a layer norm's stages).

A layer whose weights are operands of activation ops (a layer norm's
`gamma` and `beta`) names those roles in `activation_operands()`: they take
the activations' width in a 16x8 model (`keras_qat.export.checks`).

Conversion, `check_exportable`, `quant_report`, `sensitivity` and
`QuantRangeLogger` ask the layers through `model_quantizers`; none keeps a
list of classes.
"""

import keras

from keras_qat import graph

WEIGHTS = "weights"
OUTPUT = "output"
INTERMEDIATE = "intermediate"
KINDS = (WEIGHTS, OUTPUT, INTERMEDIATE)


def kind(role):
    """The kind of a role: `"weights/kernel"` -> `"weights"`."""
    return role.split("/", 1)[0]


def role_name(role):
    """The name part of a role (`"weights/kernel"` -> `"kernel"`), or the
    kind when it has none."""
    return role.split("/", 1)[-1]


def quantizers_of(layer):
    """`layer.quantizers()`, or `{}` for a layer that quantizes nothing."""
    method = getattr(layer, "quantizers", None)
    return dict(method()) if callable(method) else {}


def is_quantizing(layer):
    """Whether `layer` holds a quantizer."""
    return bool(quantizers_of(layer))


def check_float_model(model, function):
    """Raises `ValueError` when `model` already holds quantizers: `function`
    (`convert_quant_network`, `fuse`) takes the float model."""
    quantized = [layer.name for layer in graph.all_layers(model) if is_quantizing(layer)]
    if quantized:
        raise ValueError(
            f"Model '{model.name}' is already a quantization network (it has quantized "
            f"layers: {', '.join(quantized[:5])}{', ...' if len(quantized) > 5 else ''}). "
            f"`{function}` takes the float model; train this one as it is."
        )


def model_quantizers(model):
    """`(layer, role, quantizer)` for every quantizer of `model`, in graph
    order (nested models' included, where they appear)."""
    entries = []
    for operation in graph.Graph(model).operations:
        if isinstance(operation, keras.Model):
            entries += model_quantizers(operation)
            continue
        entries += [(operation, role, q) for role, q in quantizers_of(operation).items()]
    return entries
