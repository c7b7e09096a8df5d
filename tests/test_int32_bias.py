"""Biases on the int32 grid of the integer kernel (input scale x weight scale)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from reference import f32, fake_quant, nudge

import keras_qat as kq
from keras_qat import quantizers
from keras_qat.export.interpreter import tflite_interpreter

EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])


def input_grid_sources(layer):
    """The layer whose `input_scale` output each call of `layer` receives
    (None for a call without one)."""
    sources = []
    for node in layer._inbound_nodes:
        grid = node.arguments.kwargs.get("input_scale")
        sources.append(None if grid is None else grid._keras_history.operation)
    return sources


def round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def test_int32_bias_op_against_numpy():
    rng = np.random.default_rng(0)
    bias = rng.uniform(-2, 2, 64).astype(f32)
    scale = rng.uniform(1e-4, 1e-1, 64).astype(f32)
    scale[:3] = 0.0  # all-zero weight channels: bias kept
    expected = np.where(
        scale > 0, round_half_away(bias / np.where(scale > 0, scale, 1)) * scale, bias
    )
    bias_t = tf.constant(bias)
    with tf.GradientTape() as tape:
        tape.watch(bias_t)
        rounded = quantizers.int32_bias(bias_t, scale)
    np.testing.assert_allclose(rounded.numpy(), expected, rtol=1e-6, atol=0)
    assert np.any(np.abs(rounded.numpy() - bias) > 1e-3)  # it did round
    np.testing.assert_array_equal(
        tape.gradient(rounded, bias_t).numpy(), np.ones(64, f32)
    )  # straight through
    np.testing.assert_array_equal(
        quantizers.int32_bias(tf.constant([0.25, -0.25, 0.26]), 0.5).numpy(), [0.5, -0.5, 0.5]
    )


def dense_model(units=16, inputs=4, has_bn=False):
    inp = keras.Input((inputs,), name="x")
    out = keras.layers.Dense(units, name="dense")(inp)
    if has_bn:
        out = keras.layers.BatchNormalization(name="bn")(out)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    model.get_layer("dense").bias.assign(rng.uniform(-0.5, 0.5, units).astype(f32))
    if has_bn:
        bn = model.get_layer("bn")
        bn.gamma.assign(rng.uniform(0.5, 2, units).astype(f32))
        bn.beta.assign(rng.uniform(-0.5, 0.5, units).astype(f32))
        bn.moving_mean.assign(rng.uniform(-0.5, 0.5, units).astype(f32))
        bn.moving_variance.assign(rng.uniform(0.5, 2, units).astype(f32))
    return model


def calibrate(qat_model, x, steps=1):
    """Training calls with a zero learning rate: ranges (and statistics) only."""
    qat_model.compile(optimizer=keras.optimizers.SGD(0.0), loss=["mse"] * len(qat_model.outputs))
    n = len(x[0]) if isinstance(x, list) else len(x)
    y = [np.zeros((n,) + tuple(out.shape[1:]), f32) for out in qat_model.outputs]
    for _ in range(steps):
        qat_model.train_on_batch(x, y)


def reference_dense(qat_model, x, kernel, bias, round_bias=True):
    """numpy: fake-quantized input @ per-channel symmetric int8 kernel + bias
    (rounded to input scale x weight scale when `round_bias`)."""
    fq = qat_model.get_layer("x_quant")
    lo, hi = fq.min.numpy(), fq.max.numpy()
    x_q = fake_quant(x, lo, hi)
    input_scale = nudge(lo, hi, 8, False)[2]
    w_q = np.empty_like(kernel)
    weight_scale = np.empty(kernel.shape[-1], f32)
    for c in range(kernel.shape[-1]):
        column = kernel[:, c]
        w_q[:, c] = fake_quant(
            column, column.min(), column.max(), narrow_range=True, symmetric=True
        )
        weight_scale[c] = nudge(column.min(), column.max(), 8, True, symmetric=True)[2]
    if round_bias:
        step = f32(input_scale * weight_scale)
        bias = (round_half_away(bias / step) * step).astype(f32)
    return x_q @ w_q + bias, input_scale * weight_scale


def test_dense_adds_bias_on_the_accumulator_grid():
    x = np.random.default_rng(2).uniform(-1, 1, (64, 4)).astype(f32)
    qat_model = kq.convert_quant_network(dense_model(), bn_fold=False, **EXPORTABLE)
    calibrate(qat_model, x)
    layer = qat_model.get_layer("dense")
    assert input_grid_sources(layer) == [qat_model.get_layer("x_quant")]
    got = keras.Model(qat_model.inputs, layer.output).predict(x, verbose=0)
    kernel, bias = layer.dense.kernel.numpy(), layer.dense.bias.numpy()
    expected, step = reference_dense(qat_model, x, kernel, bias)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    float_bias, _ = reference_dense(qat_model, x, kernel, bias, round_bias=False)
    assert np.abs(float_bias - expected).max() > 10 * 1e-6  # the rounding is visible
    assert np.abs(float_bias - expected).max() <= 0.5 * step.max() * (1 + 1e-5)


def test_folded_batchnorm_bias_is_rounded():
    x = np.random.default_rng(3).uniform(-1, 1, (64, 4)).astype(f32)
    float_model = dense_model(has_bn=True)
    qat_model = kq.convert_quant_network(float_model, bn_fold=True, **EXPORTABLE)
    calibrate(qat_model, x)
    layer = qat_model.get_layer("dense")
    assert isinstance(layer, kq.QuantDenseBnFoldAct)
    bn = layer.bn  # moving statistics as calibration left them
    sigma = np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    gain = bn.gamma.numpy() / sigma
    kernel = (layer.dense.kernel.numpy() * gain).astype(f32)
    bias = (bn.beta.numpy() + gain * (layer.dense.bias.numpy() - bn.moving_mean.numpy())).astype(
        f32
    )
    expected, _ = reference_dense(qat_model, x, kernel, bias)
    got = keras.Model(qat_model.inputs, layer.output).predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    float_bias, _ = reference_dense(qat_model, x, kernel, bias, round_bias=False)
    assert np.abs(float_bias - expected).max() > 1e-5


def test_bias_stays_float_while_the_input_is_not_quantized():
    x = np.random.default_rng(4).uniform(-1, 1, (64, 4)).astype(f32)
    qat_model = kq.convert_quant_network(
        dense_model(), bn_fold=False, quant_delay=(0, 5), **EXPORTABLE
    )
    calibrate(qat_model, x, steps=2)  # activations still delayed
    layer = qat_model.get_layer("dense")
    got = keras.Model(qat_model.inputs, layer.output).predict(x, verbose=0)
    kernel = layer.dense.kernel.numpy()
    w_q = np.stack(
        [
            fake_quant(
                kernel[:, c],
                kernel[:, c].min(),
                kernel[:, c].max(),
                narrow_range=True,
                symmetric=True,
            )
            for c in range(kernel.shape[1])
        ],
        axis=1,
    )
    np.testing.assert_allclose(got, x @ w_q + layer.dense.bias.numpy(), atol=1e-6, rtol=0)
    calibrate(qat_model, x, steps=4)  # past the delay: rounded
    got = keras.Model(qat_model.inputs, layer.output).predict(x, verbose=0)
    expected, _ = reference_dense(qat_model, x, kernel, layer.dense.bias.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_grid_source_walks_through_layers_that_keep_the_grid():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.ZeroPadding2D(name="pad")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Dense(3, name="dense")(x)
    qat_model = kq.convert_quant_network(keras.Model(inp, x), **EXPORTABLE)
    assert input_grid_sources(qat_model.get_layer("dense")) == [qat_model.get_layer("conv_quant")]
    # The conv's input comes straight from the model input's FakeQuant.
    input_quant = qat_model.layers[1]
    assert isinstance(input_quant, kq.FakeQuant) and input_grid_sources(
        qat_model.get_layer("conv")
    ) == [input_quant]


def test_layer_without_a_known_input_grid_keeps_its_float_bias():
    x = np.random.default_rng(5).uniform(-1, 1, (16, 4)).astype(f32)
    layer = kq.QuantDenseBnAct(
        3, weight_quantizer=dict(per_channel=True, symmetric=True, narrow_range=True), name="dense"
    )
    inp = keras.Input((4,))
    model = keras.Model(inp, layer(inp))  # fed by a float model input
    layer.dense.bias.assign([0.1234567, -0.2345678, 0.3456789])
    assert input_grid_sources(layer) == [None]
    w_q = layer.weight_quantizer.quantize_weights(layer.dense.kernel).values.numpy()
    np.testing.assert_allclose(
        model.predict(x, verbose=0), x @ w_q + layer.dense.bias.numpy(), atol=1e-6
    )
    with pytest.raises(ValueError, match=r"'dense' \(QuantDenseBnAct\) adds its bias in float"):
        kq.check_exportable(model)


def test_shared_layer_called_without_input_grids_keeps_its_float_bias():
    a, b = keras.Input((4,)), keras.Input((4,))
    qa = kq.FakeQuant(name="qa")(a)
    qb = kq.FakeQuant(name="qb")(b)
    layer = kq.QuantDenseBnAct(
        3, weight_quantizer=dict(per_channel=True, symmetric=True, narrow_range=True)
    )
    model = keras.Model([a, b], [layer(qa), layer(qb)])
    assert input_grid_sources(layer) == [None, None]
    calibrate(model, [np.ones((4, 4), f32), -np.ones((4, 4), f32)])
    x = np.random.default_rng(6).uniform(-1, 1, (8, 4)).astype(f32)
    w_q = layer.weight_quantizer.quantize_weights(layer.dense.kernel).values.numpy()
    got = model.predict([x, x], verbose=0)[0]
    x_q = fake_quant(x, model.get_layer("qa").min.numpy(), model.get_layer("qa").max.numpy())
    np.testing.assert_allclose(got, x_q @ w_q + layer.dense.bias.numpy(), atol=1e-6)


def test_grid_source_is_found_again_after_loading(tmp_path):
    x = np.random.default_rng(7).uniform(-1, 1, (64, 4)).astype(f32)
    qat_model = kq.convert_quant_network(dense_model(), bn_fold=False, **EXPORTABLE)
    calibrate(qat_model, x)
    path = str(tmp_path / "model.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    assert input_grid_sources(loaded.get_layer("dense")) == [loaded.get_layer("x_quant")]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))


def test_tflite_bias_is_the_rounded_keras_bias():
    """The int32 bias in the TFLite model is the Keras layer's bias / step,
    and the Keras model's outputs land on TFLite's levels."""
    x = np.random.default_rng(8).uniform(-1, 1, (4096, 4)).astype(f32)
    qat_model = kq.convert_quant_network(dense_model(units=64), bn_fold=False, **EXPORTABLE)
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    (op,) = [
        op
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")
    ]
    tflite_bias = interpreter.get_tensor(op["inputs"][2])
    layer = qat_model.get_layer("dense")
    bias = layer.dense.bias.numpy()
    _, step = reference_dense(qat_model, x, layer.dense.kernel.numpy(), bias)
    np.testing.assert_array_equal(tflite_bias, round_half_away(bias / step).astype(np.int32))

    tflite_out, scale = kq.run_tflite(tflite_bytes, x)
    keras_out = qat_model.predict(x, verbose=0)
    exact = np.mean(np.abs(keras_out - tflite_out) < 0.5 * scale)
    assert exact >= 0.9999, exact
