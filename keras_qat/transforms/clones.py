"""Cloning layers and Keras operations, with their weights copied once the
new model is built."""

import re

import keras

from keras_qat import graph

# The attribute naming the traced layer whose call an operation came from
# (set by tracing, kept by clones; for error messages).
TRACED_FROM = "_keras_qat_traced_from"


def clone(operation, **overrides):
    """A new operation (layer, or Keras operation such as `x + 3.0`) from
    `operation`'s config, with `overrides` applied; weights are not copied.

    A `Lambda` layer is rebuilt around the same Python function: its config
    holds the function's bytecode, which Keras deserializes only outside
    safe mode.
    """
    if isinstance(operation, keras.layers.Lambda):
        new = graph.clone_lambda(operation, **overrides)
    else:
        config = operation.get_config()
        config.update(overrides)
        new = operation.__class__.from_config(config)
    if hasattr(operation, TRACED_FROM):
        setattr(new, TRACED_FROM, getattr(operation, TRACED_FROM))
    return new


class Clones:
    """The clones of a model's layers in the model being built: one per
    layer, so that shared layers stay shared, with the weights copied once
    the new model is built (a layer has no weights before)."""

    def __init__(self):
        self._clones = {}
        self._pairs = []

    def of(self, operation, make=None):
        """The clone of `operation`, made by `make()` (default: `clone`) the
        first time. A Keras operation (`x + 3.0`) has no state and is cloned
        anew each time."""
        if not isinstance(operation, keras.layers.Layer):
            return clone(operation)
        if id(operation) not in self._clones:
            self._clones[id(operation)] = make() if make else clone(operation)
            self.copy_later(operation, self._clones[id(operation)])
        return self._clones[id(operation)]

    def copy_later(self, source, target):
        """Remembers to copy `source`'s weights into `target`."""
        self._pairs.append((source, target))

    def copy_weights(self):
        """Copies the weights: into a fusion layer by its parts (a float
        fusion layer into its quantized form), else all at once."""
        for source, target in self._pairs:
            if hasattr(target, "copy_weights_from"):
                target.copy_weights_from(source)
            elif source.weights:
                target.set_weights(source.get_weights())


class UniqueNames:
    """Names of the layers of a model being built from `model`'s: a layer
    keeps its name unless another layer has it, then it becomes
    `<prefix>_<name>` (with a numeric suffix if that is taken too)."""

    def __init__(self, model):
        self._owners = {
            layer.name: id(layer) for layer in model.layers if not isinstance(layer, keras.Model)
        }
        self._assigned = {}

    def name_for(self, layer, prefix, part=False):
        """The name of `layer`'s copy (the same each time it is asked);
        with `part`, always `<prefix>_<name>` (without a number Keras
        appended to make the name unique): a part of the layer `prefix`
        names."""
        if id(layer) in self._assigned:
            return self._assigned[id(layer)]
        self._assigned[id(layer)] = name = self._new_name(layer, prefix, part)
        return name

    def _new_name(self, layer, prefix, part):
        name = layer.name
        if part:
            name = re.sub(r"_\d+$", "", name)
        if not part and self._owners.setdefault(name, id(layer)) == id(layer):
            return name
        base = name = f"{prefix}_{name}"
        suffix = 1
        while name in self._owners:
            suffix += 1
            name = f"{base}_{suffix}"
        self._owners[name] = id(layer)
        return name
