"""Nested models inlined: one flat Functional graph of layers.

A Functional or Sequential model used as a layer (a backbone inside a
classifier, a block built as its own model) is replaced by the layers it
calls, so fusing, quantizer placement and export see one graph. The layers
are cloned with their weights; a layer shared by several calls stays
shared. Layer names are kept, except where an inner layer's name is taken
by another layer: it becomes `<inner model name>_<layer name>` (with a
numeric suffix if that is taken too).
"""

import keras

from keras_qat import graph
from keras_qat.transforms.clones import Clones, UniqueNames, clone


def has_nested_models(model):
    """Whether any layer of `model` is itself a model."""
    return any(isinstance(layer, keras.Model) for layer in model.layers)


def inline_nested_models(model, keep=lambda layer: False):
    """Returns `model` with every nested model replaced by its layers.

    Args:
        model: A Functional or built Sequential model.
        keep: `layer -> bool`, the layers to use as they are rather than
            copy (custom layers that tracing replaces anyway; some do not
            survive `get_config` / `from_config`).

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
    names = UniqueNames(model)
    clones = Clones()

    def call_in(prefix):
        def call(operation, *args, **kwargs):
            if isinstance(operation, keras.Model):
                return graph.run_graph(operation, args[0], call_in(operation.name))
            if keep(operation):
                return operation(*args, **kwargs)
            layer = clones.of(
                operation, lambda: clone(operation, name=names.name_for(operation, prefix))
            )
            return layer(*args, **kwargs)

        return call

    flat = graph.rebuild(model, call_in(model.name))
    clones.copy_weights()
    return flat
