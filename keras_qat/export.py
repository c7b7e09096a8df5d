"""TFLite export of a trained quantization network, and a parity report.

`export_tflite` saves the quantization network as a SavedModel, traced so
that every fake-quant op runs unconditionally, and hands it to the TFLite
converter. The converter reads each activation's range from the FakeQuant
ops and each weight's from the weight fake-quant ops, so no representative
dataset is needed and the integer model uses exactly the trained grids.
`compare_tflite` measures how closely the result follows the Keras model.
"""

import os
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from keras_qat.layers.bn_fold import _BnFolding
from keras_qat.layers.fake_quant import FakeQuant, tracing_for_export
from keras_qat.layers.quant import _QuantizedWeights

# Ops that only convert between float and integer at the model's edges.
_EDGE_OPS = {"QUANTIZE", "DEQUANTIZE"}
_FLOAT_TYPES = (np.float32, np.float16, np.float64)


def tflite_interpreter(model_content, num_threads=None, default_delegates=True):
    """Returns an allocated TFLite interpreter for a flatbuffer.

    Uses LiteRT (`ai_edge_litert`, the optional `litert` extra) when it is
    installed, else `tf.lite.Interpreter` (deprecated in recent TensorFlow
    releases, still shipped with 2.21).

    Args:
        model_content: The flatbuffer, as bytes.
        num_threads: Number of CPU threads, `None` for the default.
        default_delegates: Whether to apply the default delegates (XNNPACK).
            Inspection of the op list needs them off.

    Returns:
        An interpreter with its tensors allocated.
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        litert = None
    module = litert if litert is not None else tf.lite
    kwargs = {}
    if not default_delegates:
        resolver = (
            litert.OpResolverType if litert is not None
            else tf.lite.experimental.OpResolverType
        )
        kwargs["experimental_op_resolver_type"] = (
            resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        interpreter = module.Interpreter(
            model_content=model_content, num_threads=num_threads, **kwargs
        )
    interpreter.allocate_tensors()
    return interpreter


def _model_layers(model):
    """Every layer of `model`, nested models' and sub-layers (such as the
    `FakeQuant` inside a `QuantConcatenate`) included."""
    return model._flatten_layers(include_self=False, recursive=True)


def check_exportable(qmodel):
    """Raises `ValueError` listing everything that keeps `qmodel` from int8.

    An int8 TFLite model needs every range calibrated and past its quant
    delay, 8-bit per-tensor activations, and weights of at most 8 bits that
    are symmetric with zero point 0 (`symmetric=True, narrow_range=True` for
    weights): TFLite's int8 kernels assume a zero weight zero point, so
    asymmetric weights would run, silently wrong. The converter folds a
    BatchNorm that follows fake-quantized weights into them; that is exact
    for per-channel weights (each channel's scale changes, its levels do
    not) but not for per-tensor weights.
    """
    problems = []
    for layer in _model_layers(qmodel):
        name = f"'{layer.name}' ({layer.__class__.__name__})"
        if isinstance(layer, FakeQuant):
            step = int(layer.step.numpy())
            if step == 0 and layer.fixed_range is None:
                problems.append(f"{name} has never seen a training batch, so it has no range")
            elif step < layer.quant_delay:
                problems.append(f"{name} is still in its quant delay ({step} of {layer.quant_delay} steps)")
            if layer.num_bits != 8:
                problems.append(f"{name} quantizes activations to {layer.num_bits} bits; int8 TFLite needs 8")
            if layer.per_channel:
                problems.append(f"{name} is per channel; TFLite activations are per tensor")
        elif isinstance(layer, _QuantizedWeights):
            if not (layer.symmetric and layer.narrow_range):
                problems.append(
                    f"{name} has asymmetric weights; TFLite int8 weights have zero point 0 "
                    "(convert with symmetric=[True, ...], narrow_range=[True, ...])"
                )
            if layer.num_bits > 8:
                problems.append(f"{name} has {layer.num_bits}-bit weights; int8 TFLite holds at most 8")
            step = int(layer.step.numpy())
            if step < layer.quant_delay:
                problems.append(f"{name} is still in its quant delay ({step} of {layer.quant_delay} steps)")
            if layer.has_bn and not layer.per_channel and not isinstance(layer, _BnFolding):
                problems.append(
                    f"{name} has per-tensor weights followed by a BatchNorm: folding the "
                    "BatchNorm's per-channel scale into them leaves them off their single "
                    "int8 grid (use bn_fold=True or per_channel=[True, ...] for weights)"
                )
    if problems:
        raise ValueError(
            "This quantization network cannot be exported as an int8 TFLite model:\n- "
            + "\n- ".join(problems)
        )


def float_ops(tflite_bytes):
    """Names of the compute ops of a TFLite model that read or write float.

    QUANTIZE / DEQUANTIZE at the model's edges are not counted.

    Args:
        tflite_bytes: The flatbuffer.

    Returns:
        A list of `"OP_NAME (tensor name)"` strings, empty for an integer
        model.
    """
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    found = []
    for op in interpreter._get_ops_details():  # pylint: disable=protected-access
        if op["op_name"] in _EDGE_OPS:
            continue
        for index in list(op["inputs"]) + list(op["outputs"]):
            if index >= 0 and tensors[index]["dtype"] in _FLOAT_TYPES:
                found.append(f"{op['op_name']} ({tensors[index]['name']})")
                break
    return found


def export_tflite(
    qmodel,
    path=None,
    *,
    input_type=tf.float32,
    output_type=tf.float32,
    allow_float_ops=False,
    strip_names=False,
):
    """Converts a trained quantization network to an int8 TFLite model.

    The model is exported as a SavedModel (traced so that every fake-quant
    op runs) and converted by `tf.lite.TFLiteConverter.from_saved_model`.
    Activation ranges come from the `FakeQuant` layers and weight ranges from
    the weights, so no representative dataset is needed. Conv2D and
    FullyConnected ops become int8 with int32 bias; per-channel weights stay
    per channel (a per-channel Dense is exported as a 1x1 CONV_2D, which the
    converter quantizes per channel).

    Args:
        qmodel: A trained model from `convert_quant_network`.
        path: Optional file to write the flatbuffer to.
        input_type: `tf.float32` (a QUANTIZE op at the input), `tf.int8` or
            `tf.uint8` (integer input, quantized with the input range).
        output_type: `tf.float32`, `tf.int8` or `tf.uint8`.
        allow_float_ops: Whether a model in which the converter left float
            compute ops is returned instead of raising.
        strip_names: Whether to remove tensor names and signature
            definitions, the strings a deployed model does not need (see
            `strip_tflite_names`).

    Returns:
        The flatbuffer, as bytes.

    Raises:
        ValueError: if a range is not calibrated or still delayed, if weights
            are asymmetric or wider than 8 bits, if activations are not 8-bit
            (all listed at once), for an unsupported `input_type` /
            `output_type`, or, unless `allow_float_ops`, if float compute ops
            are left (they are named).

    Example:

    >>> tflite_bytes = export_tflite(qat_model, "model_int8.tflite")
    >>> report = compare_tflite(qat_model, tflite_bytes, x_test)
    >>> report["top1_agreement"]
    1.0
    """
    for name, value in (("input_type", input_type), ("output_type", output_type)):
        if tf.as_dtype(value) not in (tf.float32, tf.int8, tf.uint8):
            raise ValueError(
                f"Received an invalid value for `{name}`, expected tf.float32, "
                f"tf.int8 or tf.uint8. Received: {name}={value!r}"
            )
    check_exportable(qmodel)
    with tempfile.TemporaryDirectory() as directory:
        saved_model = os.path.join(directory, "saved_model")
        with tracing_for_export():
            qmodel.export(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = tf.as_dtype(input_type)
        converter.inference_output_type = tf.as_dtype(output_type)
        tflite_bytes = converter.convert()
    left = float_ops(tflite_bytes)
    if left and not allow_float_ops:
        raise ValueError(
            "The TFLite converter left float compute ops in the model: "
            f"{', '.join(left)}. Pass allow_float_ops=True to accept a "
            "partly float model."
        )
    return _finish(tflite_bytes, path, strip_names)


def _finish(tflite_bytes, path, strip_names):
    if strip_names:
        tflite_bytes = strip_tflite_names(tflite_bytes)
    if path is not None:
        with open(path, "wb") as f:
            f.write(tflite_bytes)
    return tflite_bytes


def strip_tflite_names(tflite_bytes):
    """Returns the flatbuffer without tensor names and signature definitions.

    The interpreter runs such a model by tensor index (`get_input_details`,
    as `run_tflite` does); signature runners are gone. The strings are about
    2 KB of the int8 LeNet's 74 KB.

    Args:
        tflite_bytes: A TFLite flatbuffer, as bytes.

    Returns:
        The smaller flatbuffer, as bytes.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    flatbuffer_utils.strip_strings(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def export_float_tflite(model, path=None, strip_names=False):
    """Converts a float Keras model to a float32 TFLite model, as a baseline.

    Args:
        model: Any Keras model (for example the float fusion network).
        path: Optional file to write the flatbuffer to.
        strip_names: Whether to remove tensor names and signature
            definitions (see `strip_tflite_names`).

    Returns:
        The flatbuffer, as bytes.
    """
    with tempfile.TemporaryDirectory() as directory:
        saved_model = os.path.join(directory, "saved_model")
        model.export(saved_model, verbose=False)
        tflite_bytes = tf.lite.TFLiteConverter.from_saved_model(saved_model).convert()
    return _finish(tflite_bytes, path, strip_names)


def _io_quantization(interpreter, detail):
    """(scale, zero_point) of an input or output; of the float tensor's
    integer neighbour (across QUANTIZE / DEQUANTIZE) when it is float."""
    scale, zero_point = detail["quantization"]
    if scale:
        return scale, zero_point
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    for op in interpreter._get_ops_details():  # pylint: disable=protected-access
        if op["op_name"] == "DEQUANTIZE" and detail["index"] in op["outputs"]:
            return tensors[op["inputs"][0]]["quantization"]
        if op["op_name"] == "QUANTIZE" and detail["index"] in op["inputs"]:
            return tensors[op["outputs"][0]]["quantization"]
    return 0.0, 0


def run_tflite(tflite_bytes, x, batch_size=256, num_threads=None):
    """Runs a single-input, single-output TFLite model on float inputs `x`.

    Integer inputs are quantized and integer outputs dequantized with the
    model's own scales, so the result is comparable with the Keras model's.

    Returns:
        A tuple `(outputs, output_scale)`: float32 outputs, and the
        quantization step of the output tensor.
    """
    interpreter = tflite_interpreter(tflite_bytes, num_threads)
    (input_detail,), (output_detail,) = (
        interpreter.get_input_details(), interpreter.get_output_details()
    )
    in_scale, in_zero = _io_quantization(interpreter, input_detail)
    out_scale, out_zero = _io_quantization(interpreter, output_detail)
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = np.asarray(x[start : start + batch_size], np.float32)
        if input_detail["dtype"] != np.float32:
            info = np.iinfo(input_detail["dtype"])
            batch = np.clip(np.round(batch / in_scale) + in_zero, info.min, info.max)
            batch = batch.astype(input_detail["dtype"])
        interpreter.resize_tensor_input(input_detail["index"], batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_detail["index"], batch)
        interpreter.invoke()
        result = interpreter.get_tensor(output_detail["index"])
        if output_detail["dtype"] != np.float32:
            result = (result.astype(np.float32) - out_zero) * out_scale
        outputs.append(result.astype(np.float32))
    return np.concatenate(outputs), float(out_scale)


def compare_tflite(qmodel, tflite_bytes, x, batch_size=256):
    """Runs the Keras model and its TFLite model on `x` and compares them.

    Args:
        qmodel: The quantization network.
        tflite_bytes: Its TFLite flatbuffer (from `export_tflite`).
        x: Float inputs, a numpy array with the batch first.
        batch_size: Batch size of both runs.

    Returns:
        A dict: `top1_agreement` (fraction of rows whose argmax agrees),
        `max_abs_diff`, `mean_abs_diff`, `output_scale` (the quantization
        step of the output), `max_diff_steps` (the largest difference in
        output steps), `within_one_step` (fraction of output values at most
        one step apart), `ambiguous_rows` (fraction of rows whose two largest
        Keras outputs are at most one step apart, where a one-step
        difference can decide the argmax) and `top1_agreement_unambiguous`
        (top-1 agreement on the other rows).
    """
    keras_out = np.asarray(qmodel.predict(x, batch_size=batch_size, verbose=0))
    tflite_out, scale = run_tflite(tflite_bytes, x, batch_size)
    diff = np.abs(keras_out.astype(np.float64) - tflite_out.astype(np.float64))
    steps = diff / scale if scale else np.where(diff > 0, np.inf, 0.0)
    agree = keras_out.argmax(-1) == tflite_out.argmax(-1)
    top2 = np.sort(keras_out, axis=-1)[..., -2:]
    # Two outputs one step off each, in opposite directions, move the margin
    # between them by up to two steps.
    ambiguous = (top2[..., 1] - top2[..., 0]) <= 2.001 * scale
    return {
        "top1_agreement": float(np.mean(agree)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "output_scale": scale,
        "max_diff_steps": float(steps.max()),
        "within_one_step": float(np.mean(steps <= 1.001)),  # float32 outputs: allow 1e-3 step
        "ambiguous_rows": float(np.mean(ambiguous)),
        "top1_agreement_unambiguous": float(np.mean(agree[~ambiguous])) if np.any(~ambiguous) else 1.0,
    }
