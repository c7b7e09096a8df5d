"""Which quantization grid a layer's input lies on.

An integer conv or matmul adds its bias in int32, at the scale of its
accumulator, `input_scale * weight_scale` (Jacob et al. 2018, section 2.4;
TFLite quantizes the bias that way). A quantized Keras layer that added its
float bias would differ from the integer kernel by up to half an
accumulator step in every output, enough to move one output in a few
hundred to the next level, and through a deep network to change a few
percent of top-1 predictions. So the quantized layers round their bias to
that grid (`ops.int32_bias`), and for that they need `input_scale`.

The input scale belongs to the layer that quantized the input: a
`FakeQuant`, or a layer with a `FakeQuant` inside (`QuantConcatenate`,
`QuantAveragePooling2D`). Such layers have a method `output_grid(training)`.
A quantized layer finds its grid source when it is called on a symbolic
`KerasTensor` (when a model is built, cloned, converted or loaded), by
walking back from its input through layers that keep their input's grid
(pooling, reshaping, padding, dropout). Nothing is saved: loading a model
builds its graph again, and the source with it.

A layer called on inputs from different grid sources (a layer shared
between branches) has no single input scale and keeps its float bias.
"""

import keras

# Layers whose output lies on their input's grid in an integer model: they
# move, select or (average pooling: TFLite's int8 kernel keeps the input's
# scale) combine values without requantizing them.
GRID_PRESERVING_LAYERS = (
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Identity,
)


def grid_source(tensor):
    """The layer whose quantization grid `tensor`'s values lie on, or None.

    Args:
        tensor: A symbolic `KerasTensor` of a model under construction.

    Returns:
        The producing layer with an `output_grid` method, found through any
        grid-preserving layers in between; `None` when `tensor` is not a
        `KerasTensor` or comes from anything else (a model input, a float
        layer).
    """
    while isinstance(tensor, keras.KerasTensor):
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return None
        operation = history.operation
        if hasattr(operation, "output_grid"):
            return operation
        if not isinstance(operation, GRID_PRESERVING_LAYERS):
            return None
        tensor = operation._inbound_nodes[history.node_index].input_tensors[0]
    return None


_AMBIGUOUS = "ambiguous"


class InputGridTracking:
    """Mixin: remembers the grid source of the layer's input.

    `input_grid(training)` then returns `(input_scale, active)` from that
    source, or `None` when there is none (or several).
    """

    _input_grid_source = None

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, keras.KerasTensor):
            source = grid_source(inputs)
            known = self.__dict__.get("_input_grid_source", source)
            if known is not source:
                source = _AMBIGUOUS
            # Not an attribute Keras tracks: the source is another layer of
            # the model, not a sub-layer of this one.
            object.__setattr__(self, "_input_grid_source", source)
        return super().__call__(inputs, *args, **kwargs)

    def input_grid(self, training=False):
        """`(input_scale, active)` of the input's grid, or None if unknown.

        `active` is a boolean tensor (or Python `True` while traced for
        export): whether this call's input is quantized.
        """
        source = self._input_grid_source
        if source is None or source is _AMBIGUOUS:
            return None
        return source.output_grid(training)
