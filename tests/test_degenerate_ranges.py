"""Degenerate ranges: an all-zero first batch, an activation that never
saw a value, an all-zero weight channel. Training recovers, export refuses
what it cannot round and names the layer, or exports what it can exactly."""

import keras
import numpy as np
import pytest

import keras_qat as kq

L = keras.layers
EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])


def fit(model, x, y, steps=3, lr=0.05):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


def test_an_all_zero_first_batch_does_not_collapse_the_range_through_fit():
    rng = np.random.default_rng(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(3)(inputs))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    qat.fit(np.zeros((8, 4), "float32"), np.zeros((8, 3), "float32"), verbose=0)
    x = rng.uniform(-2, 3, (64, 4)).astype("float32")
    qat.fit(x, np.zeros((64, 3), "float32"), batch_size=64, verbose=0)
    input_quant = qat.layers[1]
    assert (input_quant.min.numpy(), input_quant.max.numpy()) == (x.min(), x.max())
    predictions = qat.predict(x, verbose=0)
    assert len(np.unique(predictions.round(4), axis=0)) > 32  # not constant


def test_export_refuses_a_range_that_never_saw_values_naming_the_layer():
    rng = np.random.default_rng(0)
    inputs = keras.Input((4,))
    dead = L.Dense(3, activation="relu", bias_initializer=keras.initializers.Constant(-100.0))
    model = keras.Model(inputs, L.Dense(2)(dead(inputs)))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    fit(qat, rng.uniform(0, 1, (8, 4)), np.zeros((8, 2)), steps=1, lr=0.0)
    with pytest.raises(ValueError, match=r"'dense_\d*_?quant' \(FakeQuant\) has no range"):
        kq.export_tflite(qat)
    zero = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)), **EXPORTABLE)
    fit(zero, np.zeros((8, 4), "float32"), np.zeros((8, 2)), steps=2, lr=0.0)
    with pytest.raises(ValueError, match="has no range"):
        kq.export_tflite(zero)


def test_an_all_zero_weight_channel_exports_and_matches():
    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3, name="conv")
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(conv(inputs))))
    kernel = conv.kernel.numpy()
    kernel[..., 1] = 0.0
    conv.kernel.assign(kernel)
    conv.bias.assign([0.1, 0.2, -0.3, 0.0])
    x = rng.uniform(-1, 1, (32, 6, 6, 3)).astype("float32")
    qat = fit(kq.convert_quant_network(model, **EXPORTABLE), x, np.zeros((32, 2)), steps=1, lr=0.0)
    report = kq.compare_tflite(qat, kq.export_tflite(qat), x)
    assert report["within_one_step"] == 1.0, report
