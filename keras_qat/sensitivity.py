"""sensitivity: which layers' quantization costs the metric most.

Quantization is turned off for one group of quantizers at a time (a
quantized layer's weights and the `FakeQuant` after it; any other
activation grid on its own) by bypassing them in inference
(`call_context.quantization_bypassed`), with the trained ranges as they are and no
retraining. The rows are sorted by how much of the metric each group's
bypass recovers; the suggested `skip_layers` is the smallest prefix of that
order (greedily, measured) that brings the metric within a tolerance of the
float model's.
"""

import keras
import numpy as np

from keras_qat import graph, quantizer_roles
from keras_qat.export.inputs import as_input_list
from keras_qat.layers.call_context import quantization_bypassed
from keras_qat.report import inference_function


def quantizer_groups(qat_model):
    """`{name: [quantizers]}` in graph order: every quantizer a layer holds
    (`keras_qat.quantizer_roles`: weights, its output's shared range,
    intermediate grids) under the layer's name, with the `FakeQuant`s that
    quantize its output; a `FakeQuant` after another layer (an `Add`, a
    model input, ...) under that layer's name."""
    groups = {}
    for layer, _, quantizer in quantizer_roles.model_quantizers(qat_model):
        name = layer.name
        if quantizer is layer:  # a FakeQuant: the grid of the layer before it
            name = graph.producer(keras.tree.flatten(layer.input)[0]).name
        groups.setdefault(name, []).append(quantizer)
    return groups


def _metric_function(metric):
    """`metric(y_true, y_pred) -> float` from a callable, a Keras metric
    object or "accuracy" (top-1 for class labels or one-hot targets)."""
    if metric == "accuracy":
        return _top1
    if isinstance(metric, keras.metrics.Metric):

        def evaluate(y_true, y_pred):
            metric.reset_state()
            metric.update_state(y_true, y_pred)
            return float(metric.result())

        return evaluate
    if callable(metric):
        return lambda y_true, y_pred: float(metric(y_true, y_pred))
    raise ValueError(
        'Received an invalid value for `metric`, expected "accuracy", a Keras '
        f"metric or a callable (y_true, y_pred) -> float. Received: metric={metric!r}"
    )


def _top1(y_true, y_pred):
    y_pred = np.asarray(y_pred)
    y_true = np.asarray(y_true)
    labels = y_true.argmax(-1) if y_true.shape == y_pred.shape else y_true.reshape(-1)
    predicted = y_pred.argmax(-1).reshape(-1)
    if labels.shape != predicted.shape:
        raise ValueError(
            'metric="accuracy" takes one class label per prediction or one-hot targets of the '
            f"outputs' shape {y_pred.shape}. Received: y of shape {y_true.shape}"
        )
    classes = y_pred.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f'metric="accuracy": class labels must lie in [0, {classes}) for outputs of '
            f"{classes} classes. Received: labels from {labels.min()} to {labels.max()}"
        )
    return float(np.mean(predicted == labels))


class Evaluator:
    """The metric of a model on `(x, y)` with some quantizers bypassed."""

    def __init__(self, qat_model, x, y, metric, batch_size):
        names = [graph.producer(t).name for t in qat_model.inputs]
        self.qat_model, self.inputs, self.y = qat_model, as_input_list(x, names), y
        self.metric, self.batch_size = _metric_function(metric), batch_size
        rows = {len(np.asarray(target)) for target in keras.tree.flatten(y)}
        if rows != {len(self.inputs[0])}:
            raise ValueError(
                f"Received targets `y` for {sorted(rows)} rows and inputs `x` for "
                f"{len(self.inputs[0])}: give one target per input row."
            )

    def __call__(self, bypassed=()):
        """The metric with `bypassed` quantizers off (all of them: None)."""
        with quantization_bypassed(bypassed):
            function = inference_function(self.qat_model)
        size = self.batch_size
        predictions = [
            keras.tree.map_structure(np.asarray, function(*[v[s : s + size] for v in self.inputs]))
            for s in range(0, len(self.inputs[0]), size)
        ]
        joined = keras.tree.map_structure(lambda *parts: np.concatenate(parts), *predictions)
        value = self.metric(self.y, joined)
        if not np.isfinite(value):
            raise ValueError(
                f"The metric is {value} on these inputs (with {_describe(bypassed)}): "
                "sensitivity needs a finite metric to rank the layers."
            )
        return value


def _describe(bypassed):
    if bypassed is None:
        return "every quantizer off"
    if not bypassed:
        return "every quantizer on"
    return f"quantizers {[q.name for q in bypassed]} off"


def sensitivity(
    qat_model,
    x,
    y,
    *,
    metric="accuracy",
    mode="max",
    layers=None,
    tolerance=0.005,
    batch_size=256,
    verbose=1,
):
    """The metric with quantization off for one group of layers at a time.

    Runs in inference with the trained ranges (no retraining). Groups are
    those of `quantizer_groups`: a quantized layer with its output
    quantizer, or another activation grid named after the layer it follows.

    Args:
        qat_model: A trained model from `convert_quant_network`.
        x: Inputs: an array, a list of arrays or a dict by input name.
        y: Targets, as `metric` takes them.
        metric: "accuracy" (top-1 of class labels or one-hot targets), a
            Keras metric object, or a callable `(y_true, y_pred) -> float`.
        mode: "max" when higher is better, "min" when lower is.
        layers: Group names to try (default: all of them).
        tolerance: How close to the float model's metric the suggested
            `skip_layers` must bring it.
        batch_size: Rows per inference call.
        verbose: 1 for a Keras progress bar, 0 for none.

    Returns:
        A `SensitivityResult`.

    Raises:
        ValueError: for an invalid `metric`, `mode` or group name, a model
            without quantizers, targets `y` of another length than `x`,
            or a metric that is not finite.
    """
    if mode not in ("max", "min"):
        raise ValueError(
            'Received an invalid value for `mode`, expected "max" or "min". '
            f"Received: mode={mode!r}"
        )
    all_groups = quantizer_groups(qat_model)
    if not all_groups:
        raise ValueError(
            f"Model '{qat_model.name}' has no quantizers: sensitivity ranks the quantized "
            "layers of a model from `convert_quant_network`. Convert the model first."
        )
    groups = _chosen_groups(all_groups, layers)
    evaluate = Evaluator(qat_model, x, y, metric, batch_size)
    progress = keras.utils.Progbar(len(groups) + 2, verbose=verbose, unit_name="evaluation")
    reference = {"float": evaluate(None)}
    progress.add(1)
    reference["quantized"] = evaluate()
    progress.add(1)
    sign = 1.0 if mode == "max" else -1.0
    rows = []
    for name, quantizers in groups.items():
        value = evaluate(quantizers)
        progress.add(1)
        recovered = sign * (value - reference["quantized"])
        rows.append(dict(group=name, metric=value, recovered=recovered))
    rows.sort(key=lambda row: -row["recovered"])

    def close_to_float(value):
        return sign * (value - reference["float"]) >= -tolerance

    suggestion = _suggest(qat_model, groups, rows, evaluate, close_to_float)
    return SensitivityResult(reference["float"], reference["quantized"], rows, *suggestion)


def _chosen_groups(groups, layers):
    if layers is None:
        return groups
    unknown = [name for name in layers if name not in groups]
    if unknown:
        raise ValueError(
            f"Received unknown group names in `layers`: {unknown}. The groups: {list(groups)}. "
            f"Received: layers={layers!r}"
        )
    return {name: groups[name] for name in layers}


def _suggest(qat_model, groups, rows, evaluate, close_to_float):
    """Greedy: the groups that recover most, in float one more at a time,
    until `close_to_float(metric)`. Returns `(layer names, metric)`."""
    layers = {layer.name for layer in qat_model.layers}
    inputs = {graph.producer(tensor).name for tensor in qat_model.inputs}
    names, bypassed, value = [], [], None
    for row in rows:
        if row["recovered"] <= 0 or row["group"] not in layers - inputs:
            continue
        names.append(row["group"])
        bypassed += groups[row["group"]]
        value = evaluate(bypassed)
        if close_to_float(value):
            break
    return names, value


class SensitivityResult:
    """What `sensitivity` found.

    Attributes:
        float_metric: The metric with every quantizer off.
        quantized_metric: The metric of the quantization network.
        rows: One dict per group, most recovering first: `group`, `metric`
            (with that group in float), `recovered`.
        suggested_skip_layers: Layer names to pass to
            `convert_quant_network(skip_layers=...)`: the groups that, in
            float together, bring the metric within the tolerance (or all
            that help, if none does).
        suggested_metric: The metric measured with those in float.
    """

    def __init__(self, float_metric, quantized_metric, rows, suggested, suggested_metric):
        self.float_metric = float_metric
        self.quantized_metric = quantized_metric
        self.rows = rows
        self.suggested_skip_layers = suggested
        self.suggested_metric = suggested_metric

    def __str__(self):
        width = max([len("group")] + [len(row["group"]) for row in self.rows])
        lines = [
            f"float {self.float_metric:.4f}, quantized {self.quantized_metric:.4f}",
            f"{'group':<{width}}  {'metric':>8}  {'recovered':>9}",
        ]
        lines += [
            f"{row['group']:<{width}}  {row['metric']:>8.4f}  {row['recovered']:>+9.4f}"
            for row in self.rows
        ]
        lines.append(f"suggested skip_layers: {self.suggested_skip_layers}")
        return "\n".join(lines)
