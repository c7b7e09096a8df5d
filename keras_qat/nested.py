"""Nested models inlined: one flat Functional graph of layers.

A Functional or Sequential model used as a layer (a backbone inside a
classifier, a block built as its own model) is replaced by the layers it
calls, so fusing, FakeQuant placement and export see one graph. The layers
are cloned with their weights; a layer shared by several calls stays
shared. Layer names are kept, except where an inner layer's name is taken
by another layer: it becomes `<inner model name>_<layer name>` (with a
numeric suffix if that is taken too).
"""

import keras


def _is_model(layer):
    return isinstance(layer, keras.Model)


def _graph_of(model):
    """The Functional graph of a Functional or built Sequential model."""
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ValueError(
                f"Nested Sequential model '{model.name}' has no input shape. "
                "Start it with keras.Input(shape) so that it can be inlined."
            )
        return functional
    if not hasattr(model, "_run_through_graph"):
        raise ValueError(
            f"Model '{model.name}' of class {model.__class__.__name__} is used "
            "inside the model being converted, but it is a subclassed model "
            "without a graph of layers. Rebuild it as a Functional model."
        )
    return model


def has_nested_models(model):
    """Whether any layer of `model` is itself a model."""
    return any(_is_model(layer) for layer in model.layers)


def inline_nested_models(model):
    """Returns `model` with every nested model replaced by its layers.

    Args:
        model: A Functional or built Sequential model.

    Returns:
        `model` itself when nothing is nested, else a new Functional model
        (with copies of the weights) that computes the same function.

    Raises:
        ValueError: for a nested subclassed model, or a nested Sequential
            model without an input shape.

    Example:

    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> inputs = keras.Input((8,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(backbone(inputs)))
    >>> [type(l).__name__ for l in inline_nested_models(model).layers]
    ['InputLayer', 'Dense', 'Dense']
    """
    if not has_nested_models(model):
        return model
    owners = {  # name -> id of the layer that keeps it
        layer.name: id(layer) for layer in model.layers if not _is_model(layer)
    }
    clones = {}  # id(layer) -> (layer, clone)

    def unique_name(layer, prefix):
        name = layer.name
        if owners.setdefault(name, id(layer)) == id(layer):
            return name
        base, suffix = f"{prefix}_{layer.name}", 1
        name = base
        while name in owners:
            suffix += 1
            name = f"{base}_{suffix}"
        owners[name] = id(layer)
        return name

    def run(graph, inputs, prefix):
        def call(layer, *args, **kwargs):
            if _is_model(layer):
                return run(_graph_of(layer), args[0], layer.name)
            if not isinstance(layer, keras.layers.Layer):  # a Keras operation such as `x + 3.0`
                return layer.__class__.from_config(layer.get_config())(*args, **kwargs)
            if id(layer) not in clones:
                config = layer.get_config()
                config["name"] = unique_name(layer, prefix)
                clones[id(layer)] = (layer, layer.__class__.from_config(config))
            return clones[id(layer)][1](*args, **kwargs)

        return graph._run_through_graph(inputs, operation_fn=lambda op: op, call_fn=call)

    graph = _graph_of(model)
    inputs = [
        keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x._keras_history.operation.name)
        for x in graph.inputs
    ]
    outputs = run(graph, inputs, model.name)
    flat = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=model.name)
    for layer, clone in clones.values():
        if layer.weights:
            clone.set_weights(layer.get_weights())
    return flat
