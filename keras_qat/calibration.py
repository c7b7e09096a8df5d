"""`calibrate`: ranges from data, without training (post-training
quantization through the same placement and export as QAT)."""

import warnings

import keras

from keras_qat import quantizer_roles
from keras_qat.layers import call_context


def calibrate(qat_model, data, *, steps=None, batch_size=32, method="min_max", verbose="auto"):
    """Sets every range of a quantization network from data, without
    training.

    The model runs in inference on `data` (as `predict` runs it, in the
    model's `tf.distribute` strategy: BatchNorm layers use their moving
    statistics, nothing is quantized, outputs are not kept), and each
    activation quantizer sets its range from the float values it sees; no
    weight, BatchNorm statistic or optimizer state changes. Then every quant
    delay counts as passed, so that the model quantizes from its next call:
    `export_tflite` right after `calibrate` is post-training quantization
    (PTQ), with the placement and parity checks of a QAT export, and `fit`
    after it is QAT started from calibrated ranges.

    Ranges learned before are forgotten (and restored if `predict` fails on
    `data`). Weights need no calibration: their
    ranges are their own min / max. Learned ranges (`LearnedFakeQuant`)
    start from the min / max of the data with either method; learned weight
    steps are set from the kernels at the next training call.

    Args:
        qat_model: A model from `convert_quant_network`.
        data: What `qat_model.predict` takes: NumPy arrays (a list or dict
            of them for several inputs), a `tf.data.Dataset` or a
            `keras.utils.PyDataset` (targets in it are ignored).
        steps: How many batches to run; None for all of `data`.
        batch_size: The batch size for arrays (datasets batch themselves).
        method: `"min_max"`: each range is the min and max over all
            batches (as the TFLite converter calibrates); or
            `"moving_average"`: each quantizer's training update (the first
            batch's range, then its moving average with its `ema_decay`).
        verbose: `predict`'s progress bar: `"auto"`, 0, 1 or 2.

    Returns:
        `qat_model`, calibrated.

    Raises:
        ValueError: for a model without quantizers, or an invalid `method`
            or `steps`.

    Warns:
        For quantizers that got no range (data that never reached them, or
        only zeros): `export_tflite` refuses the model until they have one.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> qat = kq.convert_quant_network(model)
    >>> x = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype("float32")
    >>> qat = kq.calibrate(qat, x, verbose=0)
    >>> ptq_bytes = kq.export_tflite(qat)  # post-training int8
    >>> round(float(qat.layers[1].max.numpy()), 4) == round(float(x.max()), 4)
    True
    """
    quantizers = _quantizers_of(qat_model)
    _check_arguments(method, steps)
    saved = [(variable, variable.numpy()) for q in quantizers for variable in q.weights]
    for quantizer in quantizers:
        quantizer.reset_range()
    try:
        with call_context.calibrating(method):
            _summary(qat_model).predict(data, steps=steps, batch_size=batch_size, verbose=verbose)
    except BaseException:  # bad data, an interrupt: the ranges as they were
        for variable, value in saved:
            variable.assign(value)
        raise
    for quantizer in quantizers:
        quantizer.end_delay()
    _warn_of_missing_ranges(qat_model)
    return qat_model


def _summary(qat_model):
    """A model that runs `qat_model` and returns one mean per example and
    output: `predict` keeps what it returns, and a language model's logits
    over a data set would fill the memory. Built in the model's
    `tf.distribute` strategy, which `predict` then runs it in."""
    with qat_model.distribute_strategy.scope():
        outputs = [_mean_per_example(t) for t in keras.tree.flatten(qat_model.output)]
        return keras.Model(qat_model.input, outputs, name=f"{qat_model.name}_calibration")


def _mean_per_example(tensor):
    values = keras.ops.cast(tensor, "float32")
    if len(values.shape) < 2:
        return values
    return keras.ops.mean(values, axis=tuple(range(1, len(values.shape))))


def _quantizers_of(qat_model):
    entries = quantizer_roles.model_quantizers(qat_model)
    if not entries:
        raise ValueError(
            f"Model '{qat_model.name}' has no quantizers: calibrate sets the ranges of a "
            "model from `convert_quant_network`. Convert it first."
        )
    unique = {id(quantizer): quantizer for _, _, quantizer in entries}
    return list(unique.values())


def _check_arguments(method, steps):
    if method not in call_context.CALIBRATION_METHODS:
        raise ValueError(
            "Received an invalid value for `method`, expected one of "
            f"{call_context.CALIBRATION_METHODS}. Received: method={method!r}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(
            "Received an invalid value for `steps`, expected a positive integer or None. "
            f"Received: steps={steps!r}"
        )


def _warn_of_missing_ranges(qat_model):
    missing = [
        f"'{layer.name}' ({role})"
        for layer, role, quantizer in quantizer_roles.model_quantizers(qat_model)
        if quantizer_roles.kind(role) != quantizer_roles.WEIGHTS
        and getattr(quantizer, "fixed_range", None) is None
        and not bool(quantizer.has_range())
    ]
    if missing:
        warnings.warn(
            f"calibrate: {len(missing)} quantizers got no range from the data (it never "
            f"reached them, or only zeros did): {', '.join(missing[:10])}. `export_tflite` "
            "refuses the model until they have one: calibrate on data that reaches them.",
            stacklevel=2,
        )
