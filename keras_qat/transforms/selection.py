"""Choosing a model's layers by name, class or predicate (`skip_layers`)."""

import keras


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
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = set()
    for selector in _as_list(selectors, argument):
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


def _as_list(selectors, argument):
    if isinstance(selectors, (str, type)) or callable(selectors):
        return [selectors]
    if not isinstance(selectors, (list, tuple, set)):
        raise ValueError(
            f"Received an invalid value for `{argument}`, expected layer names, layer "
            f"classes or a predicate `layer -> bool`, or a list of them. "
            f"Received: {argument}={selectors!r}"
        )
    return list(selectors)


def layer_selector(selectors, argument="skip_layers"):
    """`layer -> bool`: whether `selectors` (as in `selected_layer_names`)
    choose a layer; names are not checked here."""
    if selectors is None:
        return lambda layer: False
    selectors = _as_list(selectors, argument)

    def selects(layer):
        for selector in selectors:
            if isinstance(selector, str) and layer.name == selector:
                return True
            if isinstance(selector, type) and isinstance(layer, selector):
                return True
            if callable(selector) and not isinstance(selector, (str, type, keras.layers.Layer)):
                if selector(layer):
                    return True
        return False

    return selects
