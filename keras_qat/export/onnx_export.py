"""ONNX export of a trained quantization network, and running it.

`export_onnx` goes through the int8 TFLite model that `export_tflite` makes
(the same placement, ranges, int32 biases and checks) and converts it with
`tf2onnx.convert.from_tflite` into a QDQ ONNX model, which
`keras_qat.export.onnx_graph` then rewrites into the form ONNX Runtime runs
on integer kernels. tf2onnx's own path from TensorFlow graphs refuses the
narrow-range and per-channel fake-quant ops keras-qat trains with, and the
TFLite model already holds every integer the ONNX model needs, so the two
formats agree by construction. `run_onnx` and `compare_onnx` are
`run_tflite`'s and `compare_tflite`'s counterparts.

Needs the `onnx` extra: `pip install "keras-qat[onnx]"` (onnx, onnxruntime,
tf2onnx).
"""

import os
import tempfile

import numpy as np

from keras_qat.export.agreement import compare_with_keras
from keras_qat.export.inputs import as_input_list
from keras_qat.export.io_order import signature_tensor_names
from keras_qat.export.litert import _check_path, export_tflite
from keras_qat.export.quiet import quiet

# Per-axis DequantizeLinear (per-channel weights) needs opset 13; tf2onnx
# 1.17 writes up to 18.
MIN_OPSET, MAX_OPSET = 13, 18
_ACTIVATION_DTYPES = ("uint8", "int8")
# ONNX Runtime's names of input types: integer inputs (token ids) are fed
# as such, everything else as float32.
_ONNX_RUNTIME_TYPES = {
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def _import(module):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"ONNX export and inference need `{module}`, which keras-qat installs with its "
            f'`onnx` extra: pip install "keras-qat[onnx]" (onnx, onnxruntime, tf2onnx).'
        ) from error


def export_onnx(qat_model, path=None, *, opset=17, activation_dtype="uint8", verbose=None):
    """Converts a trained quantization network to a QDQ ONNX model.

    The model is first exported to int8 TFLite (`export_tflite` with
    `pack_int4=False`: the same checks and refusals), then converted by
    tf2onnx into QuantizeLinear / DequantizeLinear pairs around every
    quantized op: the int8 weights as initializers with per-channel scales
    where the Keras model has them, int32 biases as TFLite computed them,
    activations with the trained ranges. ONNX Runtime fuses these pairs
    into its integer kernels (QLinearConv, QLinearMatMul, QLinearAdd, ...;
    measured with the default uint8 activations). Float inputs and the
    outputs are float32 (integer inputs such as token ids stay integers),
    named as the Keras model's (its inputs' names; outputs `output_0`, ...
    or a dict's keys), the batch size left open.

    Args:
        qat_model: A trained model from `convert_quant_network`.
        path: Optional `.onnx` file to write, a `str` or `os.PathLike` in an
            existing directory.
        opset: The ONNX opset, 13 to 18 (13 is the first with per-axis
            DequantizeLinear).
        activation_dtype: `"uint8"` (the default: activations and weights
            stored as uint8, zero points moved by 128, the same real
            values: ONNX Runtime's x86 integer kernels compute these
            exactly on every CPU) or `"int8"` (TFLite's integers as they
            are; what TensorRT takes, with symmetric activations). ONNX
            Runtime's x86 kernels for int8 activations sum pairs of products
            in 16 bits with saturation on CPUs without VNNI (AVX2, AVX-512
            without VNNI): there an `"int8"` model can be many steps off
            (docs/onnx.md).
        verbose: Whether to show TensorFlow's and tf2onnx's logging.

    Returns:
        The serialized `onnx.ModelProto`, as bytes (`onnx.load_from_string`
        reads it; `onnxruntime.InferenceSession` runs it).

    Raises:
        ImportError: without `onnx` or `tf2onnx` (the `onnx` extra).
        ValueError: whatever `export_tflite` refuses; for an invalid
            `path`, `opset` or `activation_dtype`; if an op of the model has
            no ONNX form (named) or a convolution or matrix product would
            compute in float (named).
    """
    _check_arguments(opset, activation_dtype)
    _check_path(path)
    onnx = _import("onnx")
    _import("tf2onnx")
    tflite_bytes = export_tflite(qat_model, pack_int4=False, verbose=verbose)
    model = _from_tflite(tflite_bytes, opset, verbose)
    _rewrite(model, tflite_bytes, activation_dtype)
    onnx.checker.check_model(model)
    onnx_bytes = model.SerializeToString()
    if path is not None:
        with open(path, "wb") as f:
            f.write(onnx_bytes)
    return onnx_bytes


def _check_arguments(opset, activation_dtype):
    if (
        isinstance(opset, bool)
        or not isinstance(opset, (int, np.integer))
        or not (MIN_OPSET <= opset <= MAX_OPSET)
    ):
        raise ValueError(
            f"Received an invalid value for `opset`, expected an integer from {MIN_OPSET} "
            f"to {MAX_OPSET}. Received: opset={opset!r}"
        )
    if activation_dtype not in _ACTIVATION_DTYPES:
        raise ValueError(
            "Received an invalid value for `activation_dtype`, expected 'uint8' or 'int8'. "
            f"Received: activation_dtype={activation_dtype!r}"
        )


def _from_tflite(tflite_bytes, opset, verbose):
    import tf2onnx

    with tempfile.TemporaryDirectory() as directory:
        tflite_path = os.path.join(directory, "model.tflite")
        with open(tflite_path, "wb") as f:
            f.write(tflite_bytes)
        with quiet(verbose):
            model, _ = tf2onnx.convert.from_tflite(tflite_path, opset=int(opset))
    return model


def _rewrite(model, tflite_bytes, activation_dtype):
    from keras_qat.export import onnx_graph

    onnx_graph.name_inputs_and_outputs(model, *signature_tensor_names(tflite_bytes))
    onnx_graph.decompose_gelu(model)
    unsupported = onnx_graph.unsupported_ops(model)
    if unsupported:
        raise ValueError(
            "These ops of the int8 TFLite model have no ONNX form in tf2onnx: "
            f"{', '.join(unsupported)}. Export the model with `export_tflite`, or keep "
            "the layers they come from out of the model."
        )
    left = onnx_graph.float_compute_ops(model)
    if left:
        raise ValueError(
            "The ONNX model would compute these ops in float (an operand not "
            f"dequantized from integers): {', '.join(left)}."
        )
    onnx_graph.requantize_data_movement(model)
    if activation_dtype == "uint8":
        onnx_graph.activations_as_uint8(model)
        onnx_graph.weights_as_uint8(model)
    onnx_graph.remove_unused_initializers(model)


def _session(onnx_model, num_threads=None):
    ort = _import("onnxruntime")
    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    with quiet():
        return ort.InferenceSession(
            _as_bytes(onnx_model), options, providers=["CPUExecutionProvider"]
        )


def _as_bytes(onnx_model):
    if isinstance(onnx_model, (bytes, bytearray)):
        return bytes(onnx_model)
    if isinstance(onnx_model, (str, os.PathLike)):
        with open(onnx_model, "rb") as f:
            return f.read()
    if hasattr(onnx_model, "SerializeToString"):
        return onnx_model.SerializeToString()
    raise ValueError(
        "Expected an ONNX model as bytes, a path or an onnx.ModelProto. "
        f"Received: onnx_model={onnx_model!r:.80}"
    )


def _output_scales(onnx_bytes):
    """The quantization step of each graph output: the scale of the
    DequantizeLinear that computes it, 0 for another (float) output."""
    onnx = _import("onnx")
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    values = {init.name: init for init in model.graph.initializer}
    produced_by = {output: node for node in model.graph.node for output in node.output}
    scales = []
    for value in model.graph.output:
        node = produced_by.get(value.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in values:
            scales.append(float(numpy_helper.to_array(values[node.input[1]])))
        else:
            scales.append(0.0)
    return scales


def run_onnx(onnx_model, x, batch_size=256, num_threads=None):
    """Runs an ONNX model in ONNX Runtime (CPU) on float inputs `x`.

    Args:
        onnx_model: The model from `export_onnx` (bytes, a path or an
            `onnx.ModelProto`).
        x: Float inputs with the batch first: an array (one input), a list
            of arrays in the Keras model's input order, or a dict by input
            name.
        batch_size: Rows per call.
        num_threads: ONNX Runtime's intra-op threads, `None` for its default.

    Returns:
        `(outputs, output_scale)` as `run_tflite` returns them: float32
        outputs and the quantization step of each output, lists for a model
        with several outputs.

    Raises:
        ImportError: without `onnxruntime` (the `onnx` extra).
        ValueError: for empty inputs or inputs that do not match the model's, or
            a `batch_size` that is not a positive integer.
    """
    integer = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
    if not integer or batch_size < 1:
        raise ValueError(
            "Received an invalid value for `batch_size`, expected a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    onnx_bytes = _as_bytes(onnx_model)
    session = _session(onnx_bytes, num_threads)
    names = [value.name for value in session.get_inputs()]
    dtypes = [_ONNX_RUNTIME_TYPES.get(value.type, np.float32) for value in session.get_inputs()]
    inputs = as_input_list(x, names)
    batches = []
    for start in range(0, len(inputs[0]), batch_size):
        feed = {
            name: np.asarray(v[start : start + batch_size]).astype(dtype)
            for name, v, dtype in zip(names, inputs, dtypes)
        }
        batches.append(session.run(None, feed))
    outputs = [np.concatenate(parts).astype(np.float32) for parts in zip(*batches)]
    scales = _output_scales(onnx_bytes)
    if len(outputs) == 1:
        return outputs[0], scales[0]
    return outputs, scales


def compare_onnx(qat_model, onnx_model, x, batch_size=256, tie_steps=2.0):
    """Runs the Keras model and its ONNX model on `x` and compares them.

    The counterpart of `compare_tflite`, with ONNX Runtime (CPU).

    Args:
        qat_model: The quantization network.
        onnx_model: Its ONNX model (from `export_onnx`: bytes, a path or an
            `onnx.ModelProto`).
        x: Float inputs: an array, a list in the Keras model's input order,
            or a dict by input name.
        batch_size: Batch size of both runs.
        tie_steps: Rows whose two largest Keras outputs are at most this
            many output steps apart count as near-ties.

    Returns:
        What `compare_tflite` returns: a dict per output (`max_diff_steps`,
        `mean_abs_diff`, `within_one_step`, `top1_agreement_unambiguous`,
        ...), a list of them for several outputs.

    Raises:
        ImportError: without `onnxruntime`.
        ValueError: for inputs that do not match the model's, or a negative
            `tie_steps`.
    """

    def run(names, inputs):
        return run_onnx(onnx_model, dict(zip(names, inputs)), batch_size)

    return compare_with_keras(qat_model, x, run, batch_size, tie_steps)
