import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import Conv2DBnAct, DenseBnAct

L = keras.layers


def randomize_bns(model, rng):
    """Non-trivial BatchNorm statistics, so that fusing them is tested."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.5, 0.5, n),
                               rng.uniform(-0.3, 0.3, n), rng.uniform(0.5, 2.0, n)])
    return model


def plain_sequential():
    return keras.Sequential([
        keras.Input((10, 10, 3)),
        L.Conv2D(6, 3, use_bias=False), L.BatchNormalization(), L.ReLU(),
        L.Conv2D(6, 3, padding="same", activation="relu6"),
        L.Conv2D(4, 1), L.BatchNormalization(), L.ReLU(max_value=6.0),
        L.MaxPooling2D(), L.Flatten(),
        L.Dense(8), L.LeakyReLU(negative_slope=0.2),
        L.Dense(5), L.Activation("sigmoid"),
        L.Dense(3),
    ])


def plain_functional():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same")(inputs)
    a = L.BatchNormalization()(a)
    a = L.Activation("relu")(a)
    b = L.Conv2D(4, 1, padding="same")(inputs)
    b_bn = L.BatchNormalization()(b)
    merged = L.Add()([a, b_bn])
    merged = L.ReLU()(merged)
    side = L.Conv2D(4, 1)(merged)            # its output is used twice: nothing to absorb
    x = L.Concatenate()([side, L.ReLU()(side)])
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("build, expected", [
    (plain_sequential, ["Conv2DBnAct", "Conv2DBnAct", "Conv2DBnAct", "MaxPooling2D", "Flatten",
                        "DenseBnAct", "DenseBnAct", "DenseBnAct"]),
    (plain_functional, None),
])
def test_fused_network_equals_the_original(build, expected):
    rng = np.random.default_rng(0)
    model = randomize_bns(build(), rng)
    x = rng.standard_normal((4,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    fused = kq.fuse(model)
    if expected is not None:
        assert [type(layer).__name__ for layer in fused.layers] == expected
    np.testing.assert_allclose(fused.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert type(fused) is type(model)


def test_what_is_and_is_not_absorbed():
    fused = kq.fuse(plain_functional())
    kinds = {layer.name: layer for layer in fused.layers}
    conv_bn_act = [l for l in kinds.values() if isinstance(l, Conv2DBnAct) and l.has_bn]
    assert len(conv_bn_act) == 2  # both conv + BN; only the first also has its ReLU
    assert sorted(keras.activations.serialize(l.activation) for l in conv_bn_act) == ["linear", "relu"]
    # The Add's ReLU stays (not after a conv); the conv feeding two layers keeps them.
    assert sum(isinstance(l, L.ReLU) for l in fused.layers) == 2
    assert sum(isinstance(l, L.BatchNormalization) for l in fused.layers) == 0
    dense = [l for l in fused.layers if isinstance(l, DenseBnAct)][0]
    assert keras.activations.serialize(dense.activation) == "softmax"


def test_bn_after_an_activated_conv_is_not_folded():
    model = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, activation="relu"), L.BatchNormalization()])
    fused = kq.fuse(model)
    assert [type(l).__name__ for l in fused.layers] == ["Conv2DBnAct", "BatchNormalization"]
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(fused(x), model(x), rtol=1e-6, atol=1e-6)


def test_plain_models_convert_train_save_and_load(tmp_path):
    rng = np.random.default_rng(2)
    model = randomize_bns(plain_sequential(), rng)
    qmodel = kq.convert_quant_network(model, quant_delay=100, bn_fold=True)
    # Leaky ReLU and sigmoid are not fused by integer kernels: quantized before and after.
    activations = [l for l in qmodel.layers if isinstance(l, L.Activation)]
    assert len(activations) == 2
    for layer in activations:
        index = qmodel.layers.index(layer)
        assert isinstance(qmodel.layers[index - 1], kq.FakeQuant)
        assert isinstance(qmodel.layers[index + 1], kq.FakeQuant)
    x = rng.standard_normal((8, 10, 10, 3)).astype("float32")
    # Still delayed: the folded quantization network computes the original.
    np.testing.assert_allclose(qmodel.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    qmodel.compile(optimizer="sgd", loss="mse")
    qmodel.train_on_batch(x, rng.standard_normal((8, 3)).astype("float32"))
    path = str(tmp_path / "plain.keras")
    qmodel.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0), rtol=1e-6, atol=1e-6)


def test_unsupported_layers_are_still_listed():
    inputs = keras.Input((8, 8, 3))
    x = L.DepthwiseConv2D(3, name="depthwise")(inputs)
    outputs = L.Dense(2)(L.Flatten()(x))
    with pytest.raises(ValueError, match="'depthwise' \\(DepthwiseConv2D\\)"):
        kq.convert_quant_network(keras.Model(inputs, outputs))
