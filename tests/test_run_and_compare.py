"""`run_tflite` and `compare_tflite` on exported models that are not one
image in, one vector of logits out: several named inputs and outputs, a
one-unit output, a float output, an input of unknown spatial size."""

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export.interpreter import tflite_interpreter

L = keras.layers
EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])


def fit(model, x, y, steps=2):
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


def test_compare_handles_one_unit_float_and_multi_io_outputs():
    rng = np.random.default_rng(0)
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(5)(a), L.Dense(5)(b)])
    one_unit = L.Dense(1, name="one_unit")(h)
    float_head = L.Dense(2, name="float_head")(h)
    model = keras.Model({"a": a, "b": b}, [one_unit, float_head])
    qat = kq.convert_quant_network(model, skip_layers=["float_head"], **EXPORTABLE)
    x = {
        "a": rng.uniform(-1, 1, (16, 4)).astype("f4"),
        "b": rng.uniform(-1, 1, (16, 3)).astype("f4"),
    }
    fit(qat, x, [np.zeros((16, 1)), np.zeros((16, 2))])
    tflite_bytes = kq.export_tflite(qat, allow_float_ops=True)
    one, floats = kq.compare_tflite(qat, tflite_bytes, x)
    assert one["top1_agreement"] is None and one["within_one_step"] == 1.0
    assert floats["output_scale"] is None and floats["within_one_step"] is None
    assert floats["max_abs_diff"] < 1e-4 and floats["top1_agreement"] == 1.0
    listed = kq.compare_tflite(qat, tflite_bytes, [x["a"], x["b"]])
    assert listed == [one, floats]
    outputs, scales = kq.run_tflite(tflite_bytes, x)
    assert [o.shape for o in outputs] == [(16, 1), (16, 2)] and scales[1] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        kq.compare_tflite(qat, tflite_bytes, {"a": x["a"][:0], "b": x["b"][:0]})
    with pytest.raises(ValueError, match="without"):
        kq.run_tflite(tflite_bytes, {"a": x["a"]})


def test_unknown_spatial_size_exports_and_runs_after_resizing():
    rng = np.random.default_rng(0)
    inputs = keras.Input((None, None, 3))
    x = L.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    data = rng.uniform(-1, 1, (16, 9, 9, 3)).astype("float32")
    qat = fit(kq.convert_quant_network(model, **EXPORTABLE), data, np.zeros((16, 4)))
    tflite_bytes = kq.export_tflite(qat)
    interpreter = tflite_interpreter(tflite_bytes, allocate=False)
    (detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(detail["index"], [2, 12, 12, 3])
    interpreter.allocate_tensors()
    report = kq.compare_tflite(qat, tflite_bytes, data)
    assert report["within_one_step"] == 1.0, report


def two_input_model():
    """Inputs named against the alphabet: the TFLite signature lists them
    as ["alpha", "zeta"], the Keras model as ["zeta", "alpha"]."""
    zeta, alpha = keras.Input((4,), name="zeta"), keras.Input((4,), name="alpha")
    x = L.Concatenate()([L.Dense(4)(zeta), L.Dense(4)(alpha) * 3.0])
    model = keras.Model([zeta, alpha], L.Dense(3)(x))
    qat = kq.convert_quant_network(model)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(64, 4)).astype("f4"), 5 * rng.normal(size=(64, 4)).astype("f4")]
    qat(x, training=True)
    return qat, x


def test_run_tflite_takes_a_list_in_the_keras_models_input_order():
    qat, x = two_input_model()
    outputs, scale = kq.run_tflite(kq.export_tflite(qat), x)
    steps = np.abs(outputs - qat.predict(x, verbose=0)) / scale
    assert steps.max() <= 1.001


def test_quant_report_maps_the_tflite_inputs_in_the_keras_models_order():
    qat, x = two_input_model()
    report = kq.quant_report(qat, x, tflite_model=kq.export_tflite(qat))
    steps = {
        row["tensor"]: row["tflite_max_steps"]
        for row in report.rows
        if row["tflite_max_steps"] is not None
    }
    assert steps["zeta_quant"] == 0 and steps["alpha_quant"] == 0
    assert max(steps.values()) <= 1.001


def test_compare_tflite_on_dict_outputs():
    inputs = keras.Input((4,), name="x")
    hidden = L.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, {"zcls": L.Dense(3)(hidden), "box": L.Dense(2)(hidden)})
    qat = kq.convert_quant_network(model)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("f4")
    qat(x, training=True)
    reports = kq.compare_tflite(qat, kq.export_tflite(qat), x)
    assert [r["output_scale"] > 0 for r in reports] == [True, True]
    assert all(r["max_diff_steps"] <= 1.001 for r in reports)


def test_export_takes_a_numpy_bool_for_pack_int4():
    qat, x = two_input_model()
    assert kq.export_tflite(qat, pack_int4=np.True_) == kq.export_tflite(qat, pack_int4=True)


def test_exported_inputs_and_outputs_are_in_the_keras_models_order():
    names = ["input_z", "mask", "input_a", "b"]  # the converter orders these its own way
    inputs = [keras.Input((3 + i,), name=name) for i, name in enumerate(names)]
    hidden = L.Concatenate()([L.Dense(4)(x) for x in inputs])
    model = keras.Model(inputs, [L.Dense(2, name="second")(hidden), L.Dense(5)(hidden)])
    qat = kq.convert_quant_network(model)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(32, 3 + i)).astype("f4") for i in range(len(names))]
    qat(x, training=True)
    interpreter = tflite_interpreter(kq.export_tflite(qat), allocate=False)
    shapes = [tuple(d["shape"][1:]) for d in interpreter.get_input_details()]
    assert shapes == [(3,), (4,), (5,), (6,)]
    assert [tuple(d["shape"][1:]) for d in interpreter.get_output_details()] == [(2,), (5,)]
    stripped = kq.export_tflite(qat, strip_names=True)  # run by position
    outputs, scales = kq.run_tflite(stripped, x)
    for ours, theirs, scale in zip(qat.predict(x, verbose=0), outputs, scales):
        assert np.abs(ours - theirs).max() / scale <= 1.001


def test_float_export_of_a_model_with_unnamed_inputs_runs_in_the_keras_order():
    first, second = keras.Input((4,)), keras.Input((3,))  # tensor names keras_tensor_<n>
    model = keras.Model([first, second], L.Dense(2)(L.Concatenate()([first, second])))
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(8, 4)).astype("f4"), rng.normal(size=(8, 3)).astype("f4")]
    outputs, _ = kq.run_tflite(kq.export_float_tflite(model), x)
    np.testing.assert_allclose(outputs, model.predict(x, verbose=0), atol=1e-5)
