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

from keras_qat.export import pixel_inputs
from keras_qat.export.agreement import compare_with_keras
from keras_qat.export.inputs import as_input_list
from keras_qat.export.io_order import output_order
from keras_qat.export.quiet import quiet

# Ops that only convert between float and integer at the model's edges.
_EDGE_OPS = {"QUANTIZE", "DEQUANTIZE"}
_FLOAT_TYPES = (np.float32, np.float16, np.float64)


def tflite_ops(interpreter):
    """The ops of an interpreter's model: dicts with `op_name`, `inputs`
    and `outputs` (tensor indices)."""
    return interpreter._get_ops_details()


def tflite_interpreter(
    model_content,
    num_threads=None,
    default_delegates=True,
    allocate=True,
    preserve_all_tensors=False,
):
    """Returns a TFLite interpreter for a flatbuffer, allocated by default.

    Uses LiteRT (`ai_edge_litert`, the optional `litert` extra) when it is
    installed, else `tf.lite.Interpreter` (deprecated in recent TensorFlow
    releases, still shipped with 2.21).

    Args:
        model_content: The flatbuffer, as bytes.
        num_threads: Number of CPU threads, `None` for the default.
        default_delegates: Whether to apply the default delegates (XNNPACK).
            Inspection of the op list needs them off.
        allocate: Whether to allocate the tensors (at the model's input
            shapes; an unknown dimension counts as 1, which some models
            cannot run with: resize the inputs first).
        preserve_all_tensors: Whether intermediate tensors keep their values
            after `invoke` (for inspection; needs `default_delegates=False`).

    Returns:
        An interpreter.
    """
    try:
        from ai_edge_litert import interpreter as litert
    except ImportError:
        litert = None
    module = litert if litert is not None else tf.lite
    kwargs = {}
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
    if not default_delegates:
        resolver = (
            litert.OpResolverType if litert is not None else tf.lite.experimental.OpResolverType
        )
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings(), quiet():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        warnings.filterwarnings("ignore", message=".*LiteRT interpreter.*")
        interpreter = module.Interpreter(
            model_content=model_content, num_threads=num_threads, **kwargs
        )
        if allocate:
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
    # Not allocated: a model with unknown input dimensions may not run at 1.
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False, allocate=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    found = []
    for op in tflite_ops(interpreter):
        if op["op_name"] in _EDGE_OPS or _casts_to_indices(op, tensors):
            continue
        for index in list(op["inputs"]) + list(op["outputs"]):
            if index >= 0 and tensors[index]["dtype"] in _FLOAT_TYPES:
                found.append(f"{op['op_name']} ({tensors[index]['name']})")
                break
    return found


def _casts_to_indices(op, tensors):
    """A CAST of float token ids or 0 / 1 flags to integers or booleans
    (before a GATHER, a SELECT_V2): it computes nothing in float."""
    if op["op_name"] != "CAST":
        return False
    outputs = [tensors[i]["dtype"] for i in op["outputs"] if i >= 0]
    return all(np.issubdtype(dtype, np.integer) or dtype == np.bool_ for dtype in outputs)


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


def signature_inputs(interpreter, signature):
    """`(names, details)` of a signature's inputs in the order of the
    subgraph's inputs (the Keras model's, for a model from `export_tflite`:
    `keras_qat.export.io_order`), not the signature's alphabetical order."""
    details = interpreter.get_signature_runner(signature).get_input_details()
    position = {d["index"]: i for i, d in enumerate(interpreter.get_input_details())}
    names = sorted(details, key=lambda name: position[details[name]["index"]])
    return names, [details[name] for name in names]


class _Runner:
    """Runs a TFLite model by input name when it has a signature (what
    `export_tflite` writes), else by position (a stripped model: one input
    and one output, or inputs and outputs in the interpreter's order)."""

    @staticmethod
    def has_signature(tflite_bytes):
        return bool(tflite_interpreter(tflite_bytes, allocate=False).get_signature_list())

    def __init__(self, tflite_bytes, num_threads):
        self.interpreter = tflite_interpreter(tflite_bytes, num_threads, allocate=False)
        signatures = self.interpreter.get_signature_list()
        self.signature = next(iter(signatures)) if signatures else None
        if self.signature is None:
            self.inputs = self.interpreter.get_input_details()
            self.outputs = self.interpreter.get_output_details()
            self.input_names = [f"input_{i}" for i in range(len(self.inputs))]
        else:
            runner = self.interpreter.get_signature_runner(self.signature)
            self.runner = runner
            self.input_names, self.inputs = signature_inputs(self.interpreter, self.signature)
            outputs = runner.get_output_details()
            names = sorted(outputs, key=output_order)
            self.outputs = [outputs[name] for name in names]
            self._output_names = names
        self.scales = [_io_quantization(self.interpreter, d) for d in self.outputs]
        self.pixels = pixel_inputs.marked_positions(tflite_bytes)

    def run(self, batches):
        """Float outputs (a list) for one batch of inputs (a list)."""
        quantized = _to_input_types(batches, self.inputs, self.interpreter, self.pixels)
        if self.signature is not None:
            results = self.runner(**dict(zip(self.input_names, quantized)))
            results = [results[name] for name in self._output_names]
        else:
            for detail, batch in zip(self.inputs, quantized):
                self.interpreter.resize_tensor_input(detail["index"], batch.shape)
            self.interpreter.allocate_tensors()
            for detail, batch in zip(self.inputs, quantized):
                self.interpreter.set_tensor(detail["index"], batch)
            self.interpreter.invoke()
            results = [self.interpreter.get_tensor(d["index"]) for d in self.outputs]
        return [_from_output_type(r, d, s) for r, d, s in zip(results, self.outputs, self.scales)]


class TensorProbe:
    """Runs a TFLite model with every intermediate tensor kept.

    TFLite's built-in kernels run (no XNNPACK delegate, which would fuse
    tensors away), so values can differ from a delegated run where the two
    round differently (XNNPACK requantizes compute ops in float32 and an
    int8 QUANTIZE with an 8-bit multiplier, the built-in kernels in fixed
    point). Inputs are given in the Keras model's input order.

    Args:
        tflite_bytes: The flatbuffer.
    """

    def __init__(self, tflite_bytes):
        self.interpreter = tflite_interpreter(
            tflite_bytes, default_delegates=False, allocate=False, preserve_all_tensors=True
        )
        self.pixels = pixel_inputs.marked_positions(tflite_bytes)
        signatures = self.interpreter.get_signature_list()
        if signatures:
            _, self.inputs = signature_inputs(self.interpreter, next(iter(signatures)))
        else:
            self.inputs = self.interpreter.get_input_details()

    def computed_tensors(self):
        """`[(index, name, scale, zero_point, shape)]` of the integer tensors
        that an op computes (activations, not weights), per-tensor quantized;
        `shape` without the batch axis."""
        produced = {i for op in tflite_ops(self.interpreter) for i in op["outputs"]}
        return [
            (t["index"], t["name"], *t["quantization"], tuple(t["shape"][1:]))
            for t in self.interpreter.get_tensor_details()
            if t["index"] in produced
            and t["dtype"] in (np.int8, np.int16)
            and t["quantization"][0] > 0
        ]

    def run(self, batches):
        """Runs one batch (a list of arrays in input order)."""
        quantized = _to_input_types(batches, self.inputs, self.interpreter, self.pixels)
        for detail, batch in zip(self.inputs, quantized):
            self.interpreter.resize_tensor_input(detail["index"], batch.shape)
        with quiet():
            self.interpreter.allocate_tensors()
            for detail, batch in zip(self.inputs, quantized):
                self.interpreter.set_tensor(detail["index"], batch)
            self.interpreter.invoke()
        return self

    def real_value(self, index, scale, zero_point):
        """Tensor `index` after `run`, dequantized."""
        return (self.interpreter.get_tensor(index).astype(np.float64) - zero_point) * scale


def _to_input_types(batches, details, interpreter, pixels):
    """The model's input tensors for `batches` as the Keras model takes
    them: pixel inputs (`keras_qat.export.pixel_inputs`) as the integers
    they are, float values quantized where the input is an integer one."""
    return [
        np.asarray(b).astype(d["dtype"]) if i in pixels else _to_input_type(b, d, interpreter)
        for i, (b, d) in enumerate(zip(batches, details))
    ]


def _to_input_type(batch, detail, interpreter):
    if detail["dtype"] != np.float32 and not detail["quantization"][0]:
        return np.asarray(batch).astype(detail["dtype"])  # integer data, such as token ids
    batch = np.asarray(batch, np.float32)
    if detail["dtype"] == np.float32:
        return batch
    scale, zero_point = _io_quantization(interpreter, detail)
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(batch / scale) + zero_point, info.min, info.max).astype(detail["dtype"])


def _from_output_type(result, detail, quantization):
    if detail["dtype"] == np.float32:
        return result.astype(np.float32)
    scale, zero_point = quantization
    return ((result.astype(np.float32) - zero_point) * scale).astype(np.float32)


def run_tflite(tflite_bytes, x, batch_size=256, num_threads=None):
    """Runs a TFLite model on float inputs `x`, in batches.

    Integer inputs are quantized and integer outputs dequantized with the
    model's own scales, so the result is comparable with the Keras model's.
    A model written by `export_tflite` is run through its signature, by
    input name; a stripped model (`strip_names=True`) by position.

    Args:
        tflite_bytes: The flatbuffer.
        x: Float inputs with the batch first: an array (one input), a list
            of arrays in the Keras model's input order (the order of the
            TFLite model's inputs), or a dict by input name.
        batch_size: Rows per interpreter call.
        num_threads: Interpreter threads, `None` for the default.

    Returns:
        `(outputs, output_scale)`: float32 outputs and the quantization step
        of the output (0 for a float output); for a model with several
        outputs, two lists in the Keras model's output order.

    Raises:
        ValueError: for empty inputs or inputs that do not match the model's.
    """
    runner = _Runner(tflite_bytes, num_threads)
    inputs = as_input_list(x, runner.input_names)
    with quiet():  # the runtime reports the delegate it applies at the first call
        batches = [
            runner.run([v[start : start + batch_size] for v in inputs])
            for start in range(0, len(inputs[0]), batch_size)
        ]
    outputs = [np.concatenate(parts) for parts in zip(*batches)]
    scales = [float(scale) for scale, _ in runner.scales]
    if len(outputs) == 1:
        return outputs[0], scales[0]
    return outputs, scales


def compare_tflite(qat_model, tflite_bytes, x, batch_size=256, tie_steps=2.0):
    """Runs the Keras model and its TFLite model on `x` and compares them.

    Args:
        qat_model: The quantization network.
        tflite_bytes: Its TFLite flatbuffer (from `export_tflite`).
        x: Float inputs with the batch first: an array, a list of arrays in
            the Keras model's input order, or a dict by input name.
        batch_size: Batch size of both runs.
        tie_steps: Rows whose two largest Keras outputs are at most this many
            output steps apart count as near-ties (`ambiguous_rows`). The
            default 2 fits outputs at most one step apart (two outputs off in
            opposite directions); pass `2 * k` for kernels known to be up to
            `k` steps off (TFLite's INT4 kernels: 2, so 4).

    Returns:
        For a single-output model a dict: `max_abs_diff`, `mean_abs_diff`,
        `output_scale` (the quantization step of the output; None for a
        float output), `max_diff_steps` (the largest difference in output
        steps), `within_one_step` (fraction of output values at most one
        step apart; both None for a float output), `top1_agreement`
        (fraction of rows whose argmax agrees), `ambiguous_rows` (fraction of
        rows whose two largest Keras outputs are at most `tie_steps` steps
        apart, where small differences can decide the argmax; 0 for a float
        output) and
        `top1_agreement_unambiguous` (top-1 agreement on the other rows); the
        three top-1 entries are None for an output of one unit. For a model
        with several outputs, a list of such dicts in output order.

    Raises:
        ValueError: for empty inputs or inputs that do not match the model's,
            or a negative `tie_steps`.
    """

    def run(names, inputs):
        # By name through the signature; a stripped model has none (by position).
        by_name = _Runner.has_signature(tflite_bytes)
        return run_tflite(tflite_bytes, dict(zip(names, inputs)) if by_name else inputs, batch_size)

    return compare_with_keras(qat_model, x, run, batch_size, tie_steps)
