"""Running TFLite models and comparing them with the Keras model.

`tflite_interpreter` builds an interpreter (LiteRT's when installed),
`run_tflite` runs a model on float inputs, `compare_tflite` measures how
closely an int8 model follows its Keras quantization network, and
`float_ops` lists the compute ops of a model that still use float. The
interpreter's op list comes from its `_get_ops_details`, TensorFlow's only
way to read it; `tflite_ops` is the one place that calls it.
"""

import warnings

import numpy as np
import tensorflow as tf

# Ops that only convert between float and integer at the model's edges.
_EDGE_OPS = {"QUANTIZE", "DEQUANTIZE"}
_FLOAT_TYPES = (np.float32, np.float16, np.float64)


def tflite_ops(interpreter):
    """The ops of an interpreter's model: dicts with `op_name`, `inputs`
    and `outputs` (tensor indices)."""
    return interpreter._get_ops_details()


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
            litert.OpResolverType if litert is not None else tf.lite.experimental.OpResolverType
        )
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        interpreter = module.Interpreter(
            model_content=model_content, num_threads=num_threads, **kwargs
        )
    interpreter.allocate_tensors()
    return interpreter


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
    for op in tflite_ops(interpreter):
        if op["op_name"] in _EDGE_OPS:
            continue
        for index in list(op["inputs"]) + list(op["outputs"]):
            if index >= 0 and tensors[index]["dtype"] in _FLOAT_TYPES:
                found.append(f"{op['op_name']} ({tensors[index]['name']})")
                break
    return found


def _io_quantization(interpreter, detail):
    """(scale, zero_point) of an input or output; of the float tensor's
    integer neighbour (across QUANTIZE / DEQUANTIZE) when it is float."""
    scale, zero_point = detail["quantization"]
    if scale:
        return scale, zero_point
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    for op in tflite_ops(interpreter):
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
        interpreter.get_input_details(),
        interpreter.get_output_details(),
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
        "top1_agreement_unambiguous": float(np.mean(agree[~ambiguous]))
        if np.any(~ambiguous)
        else 1.0,
    }
