"""How layers are called on symbolic tensors while tracing: Keras and
keras-hub behaviours that a `call` on values does not have, worked around.

- keras-hub's `CachedMultiHeadAttention` cannot be called symbolically (the
  `compute_output_spec` it inherits takes no `cache`): traced calls pass none.
- A custom sub-layer may declare another output than its `call` returns
  (keras-hub's ESM rotary embedding): its spec is what its `call` computes.
- An `EinsumDense` declared with `None` in its `output_shape` reports an
  unknown size where its equation infers one.
"""

import contextlib
import functools
import inspect

import keras

from keras_qat import graph


def symbolic_cached_attention(layer):
    """While `layer.call` is traced, its attention sub-layers of subclasses
    with a generation cache (keras-hub's `CachedMultiHeadAttention`) take a
    symbolic call without a cache: Keras' `MultiHeadAttention` computes
    the output spec, and its `compute_output_spec` takes no `cache`."""
    return _output_specs(layer, is_cached_attention, _spec_without_cache)


def specs_from_custom_calls(layer):
    """While `layer.call` is traced, its custom sub-layers (classes of
    neither Keras nor keras_qat, traced in turn) that declare their output
    shape give the spec their `call` computes instead: keras-hub's ESM
    rotary embedding returns two tensors where the `compute_output_shape`
    it inherits declares one. A `call` that fails there keeps the declared
    spec."""

    def custom_and_declared(sub):
        declared = type(sub).compute_output_shape is not keras.layers.Layer.compute_output_shape
        custom = type(sub).__module__.split(".")[0] not in ("keras", "keras_qat")
        return sub is not layer and custom and declared

    return _output_specs(layer, custom_and_declared, _spec_of_call)


@contextlib.contextmanager
def _output_specs(layer, selected, spec):
    """While inside, each sub-layer of `layer` for which `selected(sub)`
    holds computes its symbolic output spec with `spec(sub, *args,
    **kwargs)` (unless the instance has its own)."""
    patched = []
    for sub in graph.all_layers(layer):
        if selected(sub) and "compute_output_spec" not in vars(sub):
            object.__setattr__(sub, "compute_output_spec", functools.partial(spec, sub))
            patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            object.__delattr__(sub, "compute_output_spec")


def _spec_of_call(layer, *args, **kwargs):
    try:
        return keras.Operation.compute_output_spec(layer, *args, **kwargs)
    except Exception:  # noqa: BLE001 - the declared spec, as without tracing
        return type(layer).compute_output_spec(layer, *args, **kwargs)


@contextlib.contextmanager
def einsum_dense_shapes_inferred():
    """While tracing, an `EinsumDense` declared with `None` in its
    `output_shape` (keras-hub's attention projections: `(None, heads,
    head_dim)`) gives the size its equation infers from the input there,
    as a call on values does: code after it that reads the sequence length
    (a rotary embedding's `ops.arange(ops.shape(x)[1])`) then sees it."""
    declared_shape = keras.layers.EinsumDense.compute_output_shape

    def inferred_shape(layer, input_shape):
        declared = declared_shape(layer, input_shape)
        inferred = keras.ops.einsum(
            layer.equation,
            keras.KerasTensor(tuple(input_shape)),
            keras.KerasTensor(tuple(layer.kernel.shape)),
        ).shape
        return tuple(d if d is not None else i for d, i in zip(declared, inferred))

    keras.layers.EinsumDense.compute_output_shape = inferred_shape
    try:
        yield
    finally:
        keras.layers.EinsumDense.compute_output_shape = declared_shape


# Call arguments of keras-hub's CachedMultiHeadAttention beyond Keras' own.
CACHE_ARGUMENTS = ("cache", "cache_update_index")


def is_cached_attention(operation):
    return isinstance(operation, keras.layers.MultiHeadAttention) and (
        type(operation) is not keras.layers.MultiHeadAttention
    )


def plain_attention(layer, name):
    """A Keras `MultiHeadAttention` with the options of a subclass that
    adds a generation cache (traced calls pass none); weights copied later."""
    known = inspect.signature(keras.layers.MultiHeadAttention.__init__).parameters
    config = {k: v for k, v in layer.get_config().items() if k in known or k in ("dtype",)}
    return keras.layers.MultiHeadAttention.from_config({**config, "name": name})


def _spec_without_cache(layer, *args, cache=None, cache_update_index=None, **kwargs):
    if cache is not None or cache_update_index is not None:
        raise ValueError(f"'{layer.name}' is called with a generation cache: not traced")
    return keras.layers.MultiHeadAttention.compute_output_spec(layer, *args, **kwargs)
