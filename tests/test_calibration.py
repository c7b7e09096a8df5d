"""`calibrate`: ranges from data without training, then export: post-training
quantization through the QAT placement, checked against the TFLite
converter's own PTQ and NumPy."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qat as kq
from conftest import mirrored_strategy
from keras_qat import quantizer_roles
from keras_qat.export.interpreter import run_tflite, tflite_interpreter

L = keras.layers


def float_model(seed=0):
    """conv-BN-ReLU, max pooling, Dense: briefly trained, so that the
    BatchNorm statistics are not their initial values."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 1), name="image")
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Flatten()(L.MaxPooling2D()(x))
    model = keras.Model(inputs, L.Dense(10, name="logits")(x))
    x, y = images(64, seed), np.random.default_rng(seed).integers(0, 10, 64)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, verbose=0)
    return model


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 12, 12, 1)).astype("float32")


def converter_ptq(model, x):
    """The TFLite converter's full-int8 post-training quantization."""

    def representative():
        for i in range(len(x)):
            yield [x[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def op_names(tflite_bytes):
    ops = tflite_interpreter(tflite_bytes, default_delegates=False)._get_ops_details()
    return [op["op_name"] for op in ops]


def test_calibrate_then_export_is_the_converters_ptq_and_exact_against_keras():
    model, x = float_model(), images(64, seed=1)
    qat_model = kq.calibrate(kq.convert_quant_network(model), x, verbose=0)
    tflite_model = kq.export_tflite(qat_model)
    reference = converter_ptq(model, x)
    assert op_names(tflite_model) == op_names(reference)
    result = kq.compare_tflite(qat_model, tflite_model, images(32, seed=2))
    assert result["max_diff_steps"] <= 0.01
    # The same ranges as the converter's min / max calibration: the two
    # int8 models agree to within a step.
    (ours, _), (theirs, _) = (run_tflite(m, images(32, seed=2)) for m in (tflite_model, reference))
    assert np.abs(ours - theirs).max() <= result["output_scale"] * 1.001


def activation_ranges(qat_model):
    """`(min, max)` of each activation quantizer, in graph order."""
    return [
        (float(q.min.numpy()), float(q.max.numpy()))
        for _, role, q in quantizer_roles.model_quantizers(qat_model)
        if quantizer_roles.kind(role) != quantizer_roles.WEIGHTS
    ]


def test_ranges_are_the_float_models_min_and_max_and_no_weight_changes():
    model, x = float_model(), images(40, seed=1)
    qat_model = kq.convert_quant_network(model)
    kept = {w.path: w.numpy().copy() for w in qat_model.weights if "quant" not in w.path}
    kq.calibrate(qat_model, x, batch_size=16, verbose=0)  # batches of 16, 16 and 8
    after = {w.path: w.numpy() for w in qat_model.weights}
    assert any("moving_mean" in path for path in kept)
    for path, value in kept.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    relu = keras.Model(model.input, model.get_layer("relu").output).predict(x, verbose=0)
    logits = model.predict(x, verbose=0)
    input_range, relu_range, logits_range = activation_ranges(qat_model)
    np.testing.assert_allclose(input_range, (x.min(), x.max()), rtol=1e-6)
    np.testing.assert_allclose(relu_range, (0.0, relu.max()), rtol=1e-5)
    np.testing.assert_allclose(logits_range, (logits.min(), logits.max()), rtol=1e-5)


def test_moving_average_calibration_is_each_quantizers_training_update():
    model, x = float_model(), images(48, seed=1)
    qat_model = kq.convert_quant_network(model)
    kq.calibrate(qat_model, x, batch_size=16, method="moving_average", verbose=0)
    decay = qat_model.get_layer("image_quant").ema_decay
    low, high = x[:16].min(), x[:16].max()
    for start in (16, 32):
        batch = x[start : start + 16]
        low, high = (
            decay * low + (1 - decay) * batch.min(),
            decay * high + (1 - decay) * batch.max(),
        )
    np.testing.assert_allclose(activation_ranges(qat_model)[0], (low, high), rtol=1e-5)


def test_ranges_learned_before_are_forgotten_and_the_delays_end():
    model, x = float_model(), images(32, seed=1)
    qat_model = kq.convert_quant_network(model, quant_delay=1000)
    qat_model.compile("sgd", "mse")
    qat_model.fit(x * 10, model.predict(x, verbose=0), epochs=1, verbose=0)  # wide ranges
    in_delay = qat_model.predict(x, verbose=0)  # not quantized yet
    kq.calibrate(qat_model, x, verbose=0)
    np.testing.assert_allclose(activation_ranges(qat_model)[0], (x.min(), x.max()), rtol=1e-6)
    kq.check_exportable(qat_model)  # raises while a delay has not passed
    quantized = qat_model.predict(x, verbose=0)
    difference = np.abs(quantized - in_delay).max()
    assert 0 < difference < 0.05 * np.ptp(in_delay)
    qat_model.fit(x, in_delay, epochs=1, verbose=0)  # QAT goes on from there


def test_learned_ranges_start_from_the_min_and_max_of_the_data():
    model, x = float_model(), images(32, seed=1)
    qat_model = kq.convert_quant_network(model, range_learning=True)
    kq.calibrate(qat_model, x, batch_size=8, verbose=0)
    first = qat_model.get_layer("image_quant")
    np.testing.assert_allclose(first.scale.numpy(), (x.max() - x.min()) / 255, rtol=1e-5)
    tflite_model = kq.export_tflite(qat_model)
    result = kq.compare_tflite(qat_model, tflite_model, images(16, seed=2))
    assert result["max_diff_steps"] <= 0.01


def test_calibrate_takes_a_dataset_of_pairs_and_steps():
    model, x = float_model(), images(64, seed=1)
    labels = np.zeros(64, "int64")
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16)
    qat_model = kq.calibrate(kq.convert_quant_network(model), dataset, steps=2, verbose=0)
    np.testing.assert_allclose(activation_ranges(qat_model)[0], (x[:32].min(), x[:32].max()))


def test_calibrate_under_a_strategy_gives_the_single_device_ranges():
    model, x = float_model(), images(32, seed=1)
    expected = activation_ranges(kq.calibrate(kq.convert_quant_network(model), x, verbose=0))
    with mirrored_strategy().scope():
        qat_model = kq.convert_quant_network(model)
    kq.calibrate(qat_model, x, verbose=0)
    np.testing.assert_allclose(activation_ranges(qat_model), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="percentile"), "Received: method='percentile'"),
        (dict(steps=0), "Received: steps=0"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, message):
    qat_model = kq.convert_quant_network(float_model())
    with pytest.raises(ValueError, match=message):
        kq.calibrate(qat_model, images(4), **kwargs)


def test_ranges_are_kept_when_the_data_does_not_fit_the_model():
    qat_model = kq.calibrate(kq.convert_quant_network(float_model()), images(16), verbose=0)
    before = activation_ranges(qat_model)
    with pytest.raises(ValueError):
        kq.calibrate(qat_model, np.zeros((4, 5, 5, 1), "float32"), verbose=0)
    assert activation_ranges(qat_model) == before


def test_a_float_model_is_refused():
    with pytest.raises(ValueError, match="has no quantizers: calibrate sets"):
        kq.calibrate(float_model(), images(4))


def test_quantizers_the_data_leaves_without_a_range_are_named():
    qat_model = kq.convert_quant_network(float_model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kq.calibrate(qat_model, np.zeros((8, 12, 12, 1), "float32"), verbose=0)
    messages = [str(w.message) for w in caught if "calibrate:" in str(w.message)]
    assert messages and "'image_quant' (output)" in messages[0]
