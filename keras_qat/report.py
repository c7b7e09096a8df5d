"""quant_report: where quantization hurts, tensor by tensor.

One row per quantized tensor of a quantization network, in graph order:
every activation grid (each `FakeQuant`, and the shared grid of a
`QuantConcatenate` / `QuantAveragePooling2D`) and every quantized kernel.
A row holds the grid (range, scale, zero point, bit width), how the data
uses it (the fraction of values clipped, of levels used) and two
signal-to-quantization-noise ratios:

- `local_sqnr_db`: the tensor against its own unquantized value (a
  `FakeQuant`'s input after its fused activation; the float kernel): the
  error this quantizer adds;
- `sqnr_db`: the tensor against the float model's tensor at the same place
  (the same network with every quantizer bypassed, or `float_model`): the
  error accumulated up to here.

With a TFLite model, each activation row also says how often the int8
tensor equals the Keras model's level (TFLite's reference kernels, every
tensor kept) and by how many steps it differs at most, so that a mismatch
can be traced to the first tensor where it appears.
"""

import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_qat import graph, quantizer_roles, quantizers
from keras_qat.export.inputs import as_input_list
from keras_qat.export.interpreter import TensorProbe
from keras_qat.layers.call_context import quantization_bypassed
from keras_qat.report_table import QuantReport
from keras_qat.transforms.fuse import fuse, has_fusable_layers


class ActivationTap:
    """One activation grid of the model: the layer whose output it is, its
    quantizer, the symbolic tensor it writes on the grid and the one it
    reads (None where the layer cannot say what it computes before it
    rounds: a concatenation, an attention mask)."""

    def __init__(self, layer, quantizer):
        self.layer = layer
        self.quantizer = quantizer
        # A concatenation's first call can be one that puts a shared input
        # on its grid (`onto_grid`): the tap is its concatenation.
        args, _, outputs = next(c for c in graph.node_calls(layer) if not c[1].get("onto_grid"))
        inputs = args[0]
        self.output = outputs[0]
        self.input = inputs if hasattr(layer, "unquantized_output") else None
        self.producer = graph.producer(keras.tree.flatten(inputs)[0])

    def grid(self):
        """`(nudged_min, nudged_max, scale)` of the current range, numpy."""
        q = self.quantizer
        grid_range = getattr(self.layer, "grid_range", lambda: (q.min, q.max))
        low, high = quantizers.quant_range(*grid_range(), q.symmetric)
        return tuple(
            float(v) for v in quantizers.nudged_range(low, high, q.num_bits, q.narrow_range)
        )

    def own_value(self, inputs):
        """The unquantized value of the tensor, from this tap's input."""
        if self.input is None:
            return None
        return np.asarray(self.layer.unquantized_output(inputs))


def activation_taps(qat_model):
    """The output grids of `qat_model`'s layers, in graph order."""
    return [
        ActivationTap(layer, quantizer)
        for layer, role, quantizer in quantizer_roles.model_quantizers(qat_model)
        if role == quantizer_roles.OUTPUT
    ]


class _Statistics:
    """What one tap's rows accumulate over batches."""

    def __init__(self, tap):
        self.tap = tap
        self.nudged_min, self.nudged_max, self.scale = tap.grid()
        q = tap.quantizer
        self.levels = np.zeros(2**q.num_bits, bool)
        self.sums = dict(
            count=0,
            clipped=0,
            own=0.0,
            own_error=0.0,
            reference=0.0,
            error=0.0,
            exact=0,
            compared=0,
        )
        self.max_steps = 0.0
        self.has_own = self.has_reference = self.compared = False

    def add(self, quantized, own=None, reference=None):
        if self.scale > 0:
            levels = np.rint((quantized - self.nudged_min) / self.scale).astype(np.int64)
            self.levels[np.clip(levels, 0, len(self.levels) - 1)] = True
        self.sums["count"] += quantized.size
        if own is not None:
            self.has_own = True
            self._add_own(quantized, own)
        if reference is not None:
            self.has_reference = True
            self.sums["reference"] += float(np.sum(np.square(reference, dtype=np.float64)))
            self.sums["error"] += float(np.sum(np.square(quantized - reference, dtype=np.float64)))

    def _add_own(self, quantized, own):
        outside = (own < self.nudged_min) | (own > self.nudged_max)
        self.sums["clipped"] += int(np.count_nonzero(outside))
        self.sums["own"] += float(np.sum(np.square(own, dtype=np.float64)))
        self.sums["own_error"] += float(np.sum(np.square(quantized - own, dtype=np.float64)))

    def add_tflite(self, quantized, tflite):
        self.compared = True
        # A constant's one row meets its TFLite tensor broadcast to the batch.
        steps = np.abs(tflite - quantized) / self.scale
        self.sums["exact"] += int(np.count_nonzero(steps < 0.5))
        self.sums["compared"] += steps.size
        self.max_steps = max(self.max_steps, float(steps.max(initial=0.0)))

    def row(self):
        tap, q, sums = self.tap, self.tap.quantizer, self.sums
        count = max(sums["count"], 1)
        return dict(
            tensor=tap.layer.name,
            kind="activation",
            layer=getattr(tap.producer, "name", None),
            layer_class=type(tap.producer).__name__ if tap.producer is not None else None,
            min=float(np.min(q.min)),
            max=float(np.max(q.max)),
            scale=self.scale,
            zero_point=_signed_zero_point(q, self.nudged_min, self.scale),
            num_bits=q.num_bits,
            clipped=sums["clipped"] / count if self.has_own else None,
            grid_used=float(np.mean(self.levels[_grid_levels(q)])),
            local_sqnr_db=_sqnr(sums["own"], sums["own_error"]) if self.has_own else None,
            sqnr_db=_sqnr(sums["reference"], sums["error"]) if self.has_reference else None,
            tflite_exact=sums["exact"] / max(sums["compared"], 1) if self.compared else None,
            tflite_max_steps=round(self.max_steps, 3) if self.compared else None,
        )


def _signed_zero_point(quantizer, nudged_min, scale):
    """The zero point as TFLite stores it (signed integers: -128 for a
    range starting at 0, 0 for symmetric int8 weights)."""
    if scale <= 0:
        return 0
    qmin, _ = quantizers.quant_levels(quantizer.num_bits, quantizer.narrow_range)
    return int(round(qmin - nudged_min / scale)) - 2 ** (quantizer.num_bits - 1)


def _grid_levels(quantizer):
    """The indices of the levels of a quantizer's grid."""
    qmin, qmax = quantizers.quant_levels(quantizer.num_bits, quantizer.narrow_range)
    return slice(0, qmax - qmin + 1)


def _sqnr(signal, noise):
    """`10 log10(signal / noise)` in dB; inf without noise."""
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def weight_rows(qat_model):
    """One row per quantized weight tensor: kernels (the folded kernel of a
    folded layer), embedding tables, layer norms' `gamma` and `beta`."""
    rows = []
    for layer, role, quantizer in quantizer_roles.model_quantizers(qat_model):
        if quantizer_roles.kind(role) == quantizer_roles.WEIGHTS:
            rows.append(_weight_row(layer, role, quantizer, layer.quantized_weights()[role]))
    return rows


def _weight_row(layer, role, quantizer, kernel):
    low, high = quantizers.quant_range(*quantizer.range(kernel), quantizer.symmetric)
    nudged_min, nudged_max, scale = quantizers.nudged_range(
        low, high, quantizer.num_bits, quantizer.narrow_range
    )
    quantized = quantizer.fake_quant(kernel, low, high).numpy()
    kernel, nudged_min, nudged_max, scale = (
        np.asarray(v) for v in (kernel, nudged_min, nudged_max, scale)
    )
    levels = np.rint((quantized - nudged_min) / np.where(scale > 0, scale, 1.0)).astype(np.int64)
    qmin, qmax = quantizers.quant_levels(quantizer.num_bits, quantizer.narrow_range)
    sqnr = _sqnr(
        float(np.sum(kernel.astype(np.float64) ** 2)), float(np.sum((quantized - kernel) ** 2.0))
    )
    return dict(
        tensor=f"{layer.name}/{quantizer_roles.role_name(role)}",
        kind="weights",
        layer=layer.name,
        layer_class=type(layer).__name__,
        min=float(np.min(low)),
        max=float(np.max(high)),
        scale=float(np.max(scale)),
        zero_point=_signed_zero_point(quantizer, float(np.min(nudged_min)), float(np.max(scale))),
        num_bits=quantizer.num_bits,
        clipped=float(np.mean((kernel < nudged_min) | (kernel > nudged_max))),
        grid_used=len(np.unique(levels)) / (qmax - qmin + 1),
        local_sqnr_db=sqnr,
        sqnr_db=sqnr,
        tflite_exact=None,
        tflite_max_steps=None,
    )


def inference_function(model):
    """A fresh `tf.function` of `model` in inference, traced now (so that a
    `call_context` context around this call decides what it computes)."""
    specs = [tf.TensorSpec(t.shape, t.dtype) for t in model.inputs]

    def call(*inputs):
        return model(graph.pack_inputs(model, inputs), training=False)

    function = tf.function(call, input_signature=specs)
    function.get_concrete_function()
    return function


def _probe(model, taps):
    """A model from `model`'s inputs to each tap's output and input."""
    outputs = [tap.output for tap in taps] + [tap.input for tap in taps if tap.input is not None]
    return keras.Model(model.inputs, outputs)


def _reference(qat_model, float_model, taps):
    """A function from inputs to the float tensor at each tap (None where
    `float_model` has none), and whether it is `qat_model` bypassed."""
    if float_model is None:
        with quantization_bypassed():
            function = inference_function(keras.Model(qat_model.inputs, [t.output for t in taps]))
        return lambda inputs: [np.asarray(v) for v in function(*inputs)]
    return _float_model_reference(float_model, taps)


def _float_model_reference(float_model, taps):
    """The float model's tensors at the taps, found by layer name: the
    layer a `FakeQuant` named `<name>_quant` stands after (in the fused
    float model, where activations sit in their layers)."""
    fused = fuse(float_model) if has_fusable_layers(float_model) else float_model
    names = {layer.name: layer for layer in fused.layers}
    found = [names.get(_quantized_name(tap.layer.name)) for tap in taps]
    outputs = [keras.tree.flatten(layer.output)[0] for layer in found if layer is not None]
    function = inference_function(keras.Model(fused.inputs, outputs)) if outputs else None

    def reference(inputs):
        values = iter([np.asarray(v) for v in function(*inputs)] if function else [])
        return [next(values) if layer is not None else None for layer in found]

    return reference


def _quantized_name(name):
    """`conv1` for a quantizer named `conv1_quant` (or `conv1_quant_2`)."""
    base, _, suffix = name.rpartition("_quant")
    return base if base and (suffix == "" or suffix.lstrip("_").isdigit()) else name


def _tflite_matches(probe, taps, statistics):
    """For each tap, the TFLite tensor with its grid and shape, matched by
    scale, zero point and shape (ties broken by the layer names in the
    tensor's name); None where no single tensor matches."""
    tensors = probe.computed_tensors()
    matches = []
    for tap, stats in zip(taps, statistics):
        zero_point = stats.row()["zero_point"]
        shape = tuple(tap.output.shape[1:])
        candidates = [
            t
            for t in tensors
            if np.isclose(t[2], stats.scale, rtol=1e-5, atol=0)
            and t[3] == zero_point
            and t[4] == shape
        ]
        named = [t for t in candidates if _names_tap(t[1], tap)]
        chosen = named if len(named) == 1 else candidates
        matches.append(chosen[0] if len(chosen) == 1 else None)
    return matches


def _names_tap(tensor_name, tap):
    names = [tap.layer.name] + ([tap.producer.name] if tap.producer is not None else [])
    return any(f"/{name}_" in tensor_name for name in names)


def quant_report(qat_model, x, *, float_model=None, tflite_model=None, batch_size=256):
    """Measures every quantized tensor of a quantization network on `x`.

    Args:
        qat_model: A model from `convert_quant_network`, trained (its ranges
            set).
        x: Inputs with the batch first: an array, a list of arrays in the
            model's input order, or a dict by input name.
        float_model: Optional float model to compare with (the model that
            was converted, or its fusion network): tensors are matched by
            layer name. By default the reference is `qat_model` itself with
            every quantizer bypassed.
        tflite_model: Optional int8 TFLite model of `qat_model` (bytes or a
            path) to compare tensor by tensor. Its intermediate tensors are
            read from TFLite's built-in kernels (XNNPACK, which
            `compare_tflite` and `run_tflite` use, keeps them to itself),
            which round a few ops otherwise: their int8 MEAN over the last
            axis was one step off XNNPACK's (exact) for 27 % of values, so
            a layer norm's output is up to 4 steps off here and exact in
            `compare_tflite` (TF 2.21, measured).
        batch_size: Rows per inference call.

    Returns:
        A `QuantReport`: rows in graph order, each a dict of `COLUMNS`.

    Raises:
        ValueError: for inputs that do not match the model's, a model
            without quantizers, a `batch_size` that is not a positive
            integer, or a TFLite model that is not this model's export.

    Warns:
        UserWarning: when some grids have no range yet (an untrained model).

    Example:

    >>> inputs = keras.Input((4,), name="x")
    >>> outputs = keras.layers.Dense(3, name="head")(inputs)
    >>> qat = kq.convert_quant_network(keras.Model(inputs, outputs))
    >>> x = np.random.default_rng(0).uniform(-1, 1, (32, 4)).astype("float32")
    >>> _ = qat(x, training=True)  # sets the ranges
    >>> report = kq.quant_report(qat, x)
    >>> [row["tensor"] for row in report.rows]
    ['x_quant', 'head/kernel', 'head_quant']
    """
    taps = activation_taps(qat_model)
    _check_report_arguments(qat_model, taps, batch_size)
    names = [graph.producer(t).name for t in qat_model.inputs]
    inputs = as_input_list(x, names)
    statistics = [_Statistics(tap) for tap in taps]
    run = _Runs(qat_model, taps, float_model, tflite_model, statistics)
    for start in range(0, len(inputs[0]), batch_size):
        run.add([v[start : start + batch_size] for v in inputs])
    rows = {row["tensor"]: row for row in [s.row() for s in statistics] + weight_rows(qat_model)}
    return QuantReport(_in_graph_order(qat_model, rows))


def _check_report_arguments(qat_model, taps, batch_size):
    """Raises `ValueError` for a model without quantizers or a bad
    `batch_size`; warns of grids that have no range yet."""
    if not quantizer_roles.model_quantizers(qat_model):
        raise ValueError(
            f"Model '{qat_model.name}' has no quantizers: quant_report measures the "
            "quantized tensors of a model from `convert_quant_network`. Convert it first."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            "Received an invalid value for `batch_size`, expected a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    uncalibrated = [
        tap.layer.name
        for tap in taps
        if tap.quantizer.fixed_range is None and not bool(tap.quantizer.has_range())
    ]
    if uncalibrated:
        warnings.warn(
            f"{len(uncalibrated)} grids have no range yet ({', '.join(uncalibrated[:5])}"
            f"{', ...' if len(uncalibrated) > 5 else ''}): they have seen no training batch, "
            "and their rows describe an empty grid. Train (or calibrate) the model first.",
            stacklevel=3,
        )


def _check_tflite_model(probe, matches, qat_model):
    """Raises `ValueError` when the TFLite model is not `qat_model`'s export:
    other inputs, or none of its tensors."""
    shapes = [_shapes(probe.inputs), sorted(_shapes(probe.interpreter.get_output_details()))]
    expected = [
        [tuple(t.shape[1:]) for t in qat_model.inputs],
        sorted(tuple(t.shape[1:]) for t in qat_model.outputs),
    ]
    if shapes != expected or (matches and all(m is None for m in matches)):
        raise ValueError(
            f"The TFLite model is not an export of model '{qat_model.name}': its input and "
            f"output shapes {shapes} (the model's: {expected}), and it has "
            f"{sum(m is not None for m in matches)} of the model's {len(matches)} "
            "quantized tensors. Pass the bytes that export_tflite returned for this model."
        )


def _shapes(details):
    return [tuple(int(n) for n in d["shape"][1:]) for d in details]


class _Runs:
    """The models run on each batch: the quantized taps, their reference,
    and the TFLite model's tensors."""

    def __init__(self, qat_model, taps, float_model, tflite_model, statistics):
        self.taps, self.statistics = taps, statistics
        self.quantized = inference_function(_probe(qat_model, taps))
        self.reference = _reference(qat_model, float_model, taps)
        self.probe = self.matches = None
        if tflite_model is not None:
            self.probe = TensorProbe(_read_bytes(tflite_model))
            self.matches = _tflite_matches(self.probe, taps, statistics)
            _check_tflite_model(self.probe, self.matches, qat_model)

    def add(self, batch):
        values = [np.asarray(v) for v in self.quantized(*batch)]
        outputs, own_inputs = iter(values[: len(self.taps)]), iter(values[len(self.taps) :])
        references = self.reference(batch)
        if self.probe is not None:
            self.probe.run(batch)
        for i, (tap, stats) in enumerate(zip(self.taps, self.statistics)):
            quantized = next(outputs)
            own = tap.own_value(next(own_inputs)) if tap.input is not None else None
            reference = references[i]
            if reference is not None and reference.shape != quantized.shape:
                reference = None
            stats.add(quantized, own, reference)
            if self.matches is not None and self.matches[i] is not None:
                index, _, scale, zero_point, _ = self.matches[i]
                stats.add_tflite(quantized, self.probe.real_value(index, scale, zero_point))


def _read_bytes(tflite_model):
    if isinstance(tflite_model, (bytes, bytearray)):
        return bytes(tflite_model)
    with open(tflite_model, "rb") as f:
        return f.read()


def _in_graph_order(qat_model, rows):
    """Rows ordered as their layers appear in the graph: a layer's kernel
    before the activation grid that follows it."""
    ordered = []
    for op in graph.Graph(qat_model).operations:
        keys = [key for key in rows if key.startswith(f"{op.name}/")] + [op.name]
        for key in keys:
            if key in rows and rows[key] not in ordered:
                ordered.append(rows[key])
    return ordered + [row for row in rows.values() if row not in ordered]


def range_rows(qat_model):
    """The rows of `quant_report` that need no data: each grid's range,
    scale, zero point and bit width (the other columns None), kernels
    included. What a training callback can log at every epoch."""
    rows = {}
    for tap in activation_taps(qat_model):
        row = _Statistics(tap).row()
        row.update(grid_used=None)
        rows[row["tensor"]] = row
    for row in weight_rows(qat_model):
        rows[row["tensor"]] = row
    return _in_graph_order(qat_model, rows)
