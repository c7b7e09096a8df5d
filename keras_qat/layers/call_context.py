"""How quantizers behave while a model is traced for a purpose.

A quantization network decides at run time whether each quantizer
quantizes (its quant delay may not have passed). Two tools need a fixed
answer, decided when the model is traced:

- `tracing_for_export()`: every quantizer quantizes, unconditionally, so
  that the TFLite converter sees each fake-quant op (`export_tflite`), and
  weights of up to 4 bits are traced for INT4 or int8 storage;
- `quantization_bypassed(quantizers)`: those quantizers (all of them with
  `None`) pass their inputs through in inference, so that a report
  can compare a model with its float self, one layer at a time if need be
  (`quant_report`, `sensitivity`);
- `calibrating(method)`: in inference, activation quantizers set their
  ranges from the batch and every quantizer passes its input through, so
  that ranges are those of the float model (`keras_qat.calibrate`).

Both are read when a call is traced: a `tf.function` traced outside the
context (such as a compiled `predict`) keeps what it traced.
"""

import contextlib
import threading

_state = threading.local()


@contextlib.contextmanager
def tracing_for_export(pack_int4=True, weight_groups=None):
    """Within this context, quantizers quantize unconditionally in inference.

    `export_tflite` traces the model inside this context, after checking that
    every delay has passed and every range is calibrated. `pack_int4` says
    whether weights of 2 to 4 bits are traced so that the converter stores
    them as INT4 (True) or as int8 tensors holding the same levels (False).
    `weight_groups` maps `id(weight quantizer)` to a group of quantizations
    that would trace to the same constant (a shared layer, equal kernels):
    each gets its own copy number (`weight_copy`).
    """
    previous = [getattr(_state, name, None) for name in _EXPORT_STATE]
    _state.export, _state.pack_int4 = True, pack_int4
    _state.weight_groups, _state.copies = dict(weight_groups or {}), {}
    try:
        yield
    finally:
        for name, value in zip(_EXPORT_STATE, previous):
            setattr(_state, name, value)


_EXPORT_STATE = ("export", "pack_int4", "weight_groups", "copies")


def weight_copy(quantizer):
    """While tracing for export, the number of this quantization among
    those of the same weights (`tracing_for_export`'s `weight_groups`):
    1 for the first traced, 2 for the next, ...; 0 for weights quantized
    once. Every copy is then a constant of its own, however often the
    model is traced (a first copy kept as it is, an all-ones gamma, became
    a multiplication by one that the converter removes)."""
    group = (getattr(_state, "weight_groups", None) or {}).get(id(quantizer))
    if group is None:
        return 0
    copy = _state.copies.get(group, 0) + 1
    _state.copies[group] = copy
    return copy


def is_tracing_for_export():
    """Whether the model is being traced by `export_tflite`."""
    return bool(getattr(_state, "export", False))


def packs_int4():
    """Whether weights of up to 4 bits are traced for INT4 storage (see
    `tracing_for_export`)."""
    pack_int4 = getattr(_state, "pack_int4", None)
    return True if pack_int4 is None else pack_int4


@contextlib.contextmanager
def quantization_bypassed(quantizers=None):
    """Within this context the given quantizers (`FakeQuant` /
    `WeightQuantizer` layers, sub-layers included; all quantizers when None)
    pass their inputs through in inference calls."""
    previous = getattr(_state, "bypassed", frozenset())
    chosen = ALL if quantizers is None else frozenset(id(q) for q in quantizers)
    _state.bypassed = chosen | previous
    try:
        yield
    finally:
        _state.bypassed = previous


def is_bypassed(quantizer):
    """Whether `quantizer` passes its inputs through (see
    `quantization_bypassed`)."""
    bypassed = getattr(_state, "bypassed", frozenset())
    return bypassed is ALL or id(quantizer) in bypassed


class _All:
    """Every quantizer (`quantization_bypassed(None)`)."""

    def __or__(self, other):
        return self

    __ror__ = __or__


ALL = _All()


# How `calibrating` sets ranges from batches.
CALIBRATION_METHODS = ("min_max", "moving_average")


@contextlib.contextmanager
def calibrating(method):
    """Within this context, inference calls calibrate: each activation
    quantizer updates its range from the batch (`method`: `"min_max"`, the
    running min and max, or `"moving_average"`, its training update) and
    every quantizer passes its input through.

    Unlike the other contexts, this one holds for every thread: a
    `MirroredStrategy` traces each replica's call in a thread of its own.
    """
    global _calibration
    previous, _calibration = _calibration, method
    try:
        yield
    finally:
        _calibration = previous


_calibration = None


def calibration_method():
    """The method of the enclosing `calibrating` context, or None."""
    return _calibration
