"""What the transforms share: cloning layers with their weights, and
choosing layers by name, class or predicate."""

import keras

from keras_qat import graph


def clone(operation, **overrides):
    """A new operation (layer, or Keras operation such as `x + 3.0`) from
    `operation`'s config, with `overrides` applied; weights are not copied.

    A `Lambda` layer is rebuilt around the same Python function: its config
    holds the function's bytecode, which Keras deserializes only outside
    safe mode.
    """
    if isinstance(operation, keras.layers.Lambda):
        return graph.clone_lambda(operation, **overrides)
    config = operation.get_config()
    config.update(overrides)
    return operation.__class__.from_config(config)


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


def selected_layer_names(model, selectors, argument="skip_layers"):
    """Names of the layers of `model` that `selectors` choose.

    Args:
        model: A Sequential or Functional model.
        selectors: `None`, or one or a list of: a layer name, a layer class
            (its subclasses match too), or a predicate `layer -> bool`.
        argument: The argument's name, for error messages.

    Returns:
        A set of layer names.

    Raises:
        ValueError: for a name that is not a layer of `model`, or a selector
            of another type.
    """
    if selectors is None:
        return set()
    if isinstance(selectors, (str, type)) or callable(selectors):
        selectors = [selectors]
    if not isinstance(selectors, (list, tuple, set)):
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected layer names, layer "
            f"classes or a predicate `layer -> bool`, or a list of them. "
            f"Received: {argument}={selectors!r}"
        )
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = set()
    for selector in selectors:
        if isinstance(selector, keras.layers.Layer):
            raise ValueError(
                f"Received a layer object in `{argument}`; pass its name "
                f"('{selector.name}') or its class instead. Received: {argument}={selectors!r}"
            )
        if isinstance(selector, str):
            if selector not in {layer.name for layer in layers}:
                raise ValueError(
                    f"Received an invalid value for `{argument}`: model "
                    f"'{model.name}' has no layer named '{selector}'. Its "
                    f"layers: {', '.join(layer.name for layer in layers)}."
                )
            names.add(selector)
        elif isinstance(selector, type):
            names.update(layer.name for layer in layers if isinstance(layer, selector))
        elif callable(selector):
            names.update(layer.name for layer in layers if selector(layer))
        else:
            raise ValueError(
                f"Received an invalid value for `{argument}`, expected layer "
                "names, layer classes or a predicate `layer -> bool`. "
                f"Received: {argument}={selectors!r}"
            )
    return names


def has_operation(model, predicate, skipped=()):
    """Whether `model` has an operation for which `predicate` holds, not
    named in `skipped` (the names of skipped layers)."""
    return any(predicate(op) and op.name not in skipped for op in graph.Graph(model).operations)
