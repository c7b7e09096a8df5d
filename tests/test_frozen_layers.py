"""Frozen layers (trainable=False) stay bit-identical through quantization-
aware training, fused or folded with what follows them or not."""

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


def images(rng, n=32, size=8, channels=3):
    return rng.uniform(-1, 1, (n, size, size, channels)).astype("float32")


def trainable_count(model):
    return sum(np.prod(v.shape) for v in model.trainable_weights)


def backbone(rng):
    body = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
        ],
        name="backbone",
    )
    body.get_layer("bn").moving_variance.assign(rng.uniform(0.5, 2, 4))
    return body


def classifier(body):
    inputs = keras.Input((8, 8, 3))
    x = L.Flatten()(body(inputs))
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def frozen_state(model, names):
    return {
        v.path: v.numpy().copy()
        for layer in model.layers
        if layer.name in names
        for v in layer.weights
        if "step" not in v.path
    }


@pytest.mark.parametrize("how", ["layers", "nested_model", "after_conversion"])
@pytest.mark.parametrize("bn_fold", [True, False])
def test_frozen_layers_stay_bit_identical_through_qat(how, bn_fold):
    rng = np.random.default_rng(0)
    body = backbone(rng)
    if how == "layers":
        body.get_layer("conv").trainable = False
        body.get_layer("bn").trainable = False
    elif how == "nested_model":
        body.trainable = False
    model = classifier(body)
    float_trainable = trainable_count(model)
    qat = kq.convert_quant_network(model, bn_fold=bn_fold, **EXPORTABLE)
    if how == "after_conversion":
        qat.get_layer("conv").trainable = False
    else:
        assert trainable_count(qat) == float_trainable
    before = frozen_state(qat, {"conv"})
    fit(qat, images(rng), rng.standard_normal((32, 3)).astype("float32"))
    after = frozen_state(qat, {"conv"})
    assert before.keys() == after.keys() and len(before) >= 5  # kernel, bias, gamma, beta, stats
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert not np.array_equal(qat.get_layer("head").dense.kernel.numpy(), 0)  # the rest trained


def test_frozen_standalone_batchnorm_keeps_its_statistics_and_trains_nothing():
    rng = np.random.default_rng(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu")(inputs)  # an activated conv: the BN stands alone
    x = L.BatchNormalization(name="bn", trainable=False)(x)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    model.get_layer("bn").moving_mean.assign(rng.uniform(-1, 1, 4))
    float_trainable = trainable_count(model)
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    bn_layer = qat.get_layer("bn")
    assert isinstance(bn_layer, kq.QuantDepthwiseConv2DBnFoldAct) and not bn_layer.trainable
    assert trainable_count(qat) == float_trainable
    before = frozen_state(qat, {"bn"})
    fit(qat, images(rng), rng.standard_normal((32, 2)).astype("float32"))
    for path, value in frozen_state(qat, {"bn"}).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_standalone_batchnorm_trains_only_its_own_weights():
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn")(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    float_trainable = trainable_count(model)
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    layer = qat.get_layer("bn")
    assert not layer.depthwise.trainable  # the 1x1 kernel of ones stays ones
    assert trainable_count(qat) == float_trainable
    reloaded = kq.QuantDepthwiseConv2DBnFoldAct.from_config(layer.get_config())
    assert reloaded.get_config()["linear_trainable"] is False
