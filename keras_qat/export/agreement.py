"""How closely an exported integer model follows its Keras model.

`compare_with_keras` runs the quantization network and an exported model
(TFLite or ONNX, through a `run` function) on the same inputs and measures
the difference per output in output quantization steps, with the top-1
agreement on rows that are not near-ties. `compare_tflite` and
`compare_onnx` are its two uses.
"""

import keras
import numpy as np

from keras_qat import graph
from keras_qat.export.inputs import as_input_list


def agreement(keras_out, exported_out, scale, tie_steps):
    """The comparison of one output (see `keras_qat.compare_tflite`)."""
    diff = np.abs(keras_out.astype(np.float64) - exported_out.astype(np.float64))
    report = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "output_scale": scale or None,
        "max_diff_steps": float((diff / scale).max()) if scale else None,
        # float32 outputs: allow 1e-3 step
        "within_one_step": float(np.mean(diff / scale <= 1.001)) if scale else None,
    }
    if keras_out.shape[-1] < 2:  # one unit: no top-1
        return dict(
            report, top1_agreement=None, ambiguous_rows=None, top1_agreement_unambiguous=None
        )
    agree = keras_out.argmax(-1) == exported_out.argmax(-1)
    top2 = np.sort(keras_out, axis=-1)[..., -2:]
    # Two outputs one step off each, in opposite directions, move the margin
    # between them by up to two steps. A float output has no steps.
    margin = top2[..., 1] - top2[..., 0]
    ambiguous = margin <= (tie_steps + 0.001) * scale if scale else np.zeros_like(agree)
    clear = agree[~ambiguous]
    return dict(
        report,
        top1_agreement=float(np.mean(agree)),
        ambiguous_rows=float(np.mean(ambiguous)),
        top1_agreement_unambiguous=float(np.mean(clear)) if clear.size else 1.0,
    )


def compare_with_keras(qat_model, x, run, batch_size, tie_steps):
    """`agreement` of each output of `qat_model` with `run(names, inputs)`,
    which runs the exported model on the inputs (a list of arrays in the
    Keras model's input order, with their names) and returns `(outputs,
    scales)` as `run_tflite` does. A dict for one output, else a list."""
    if not tie_steps >= 0:
        raise ValueError(
            f"Received an invalid value for `tie_steps`, expected a number >= 0. "
            f"Received: tie_steps={tie_steps!r}"
        )
    names = [graph.producer(tensor).name for tensor in qat_model.inputs]
    inputs = as_input_list(x, names)
    keras_out = qat_model.predict(
        graph.pack_inputs(qat_model, inputs), batch_size=batch_size, verbose=0
    )
    exported_out, scales = run(names, inputs)
    if len(qat_model.outputs) == 1:
        return agreement(np.asarray(keras_out), exported_out, scales, tie_steps)
    keras_out = keras.tree.flatten(keras_out)
    return [
        agreement(np.asarray(k), e, s, tie_steps)
        for k, e, s in zip(keras_out, exported_out, scales)
    ]
