import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import Conv2DBnAct, DenseBnAct

L = keras.layers


def randomize_bns(model, rng):
    """Non-trivial BatchNorm statistics, so that fusing them is tested
    (nested models' BatchNorms too)."""
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.uniform(-0.5, 0.5, n),
                    rng.uniform(-0.3, 0.3, n),
                    rng.uniform(0.5, 2.0, n),
                ]
            )
    return model


def plain_sequential():
    return keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            L.Conv2D(6, 3, use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.Conv2D(6, 3, padding="same", activation="relu6"),
            L.Conv2D(4, 1),
            L.BatchNormalization(),
            L.ReLU(max_value=6.0),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(8),
            L.LeakyReLU(negative_slope=0.2),
            L.Dense(5),
            L.Activation("sigmoid"),
            L.Dense(3),
        ]
    )


def plain_functional():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same")(inputs)
    a = L.BatchNormalization()(a)
    a = L.Activation("relu")(a)
    b = L.Conv2D(4, 1, padding="same")(inputs)
    b_bn = L.BatchNormalization()(b)
    merged = L.Add()([a, b_bn])
    merged = L.ReLU()(merged)
    side = L.Conv2D(4, 1)(merged)  # its output is used twice: nothing to absorb
    x = L.Concatenate()([side, L.ReLU()(side)])
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "build, expected",
    [
        (
            plain_sequential,
            [
                "InputLayer",
                "Conv2DBnAct",
                "Conv2DBnAct",
                "Conv2DBnAct",
                "MaxPooling2D",
                "Flatten",
                "DenseBnAct",
                "DenseBnAct",
                "DenseBnAct",
            ],
        ),
        (plain_functional, None),
    ],
)
def test_fused_network_equals_the_original(build, expected):
    rng = np.random.default_rng(0)
    model = randomize_bns(build(), rng)
    x = rng.standard_normal((4,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    fused = kq.fuse(model)
    if expected is not None:
        assert [type(layer).__name__ for layer in fused.layers] == expected
    np.testing.assert_allclose(
        fused.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    assert not isinstance(fused, keras.Sequential)  # one Functional path


def test_what_is_and_is_not_absorbed():
    fused = kq.fuse(plain_functional())
    kinds = {layer.name: layer for layer in fused.layers}
    conv_bn_act = [
        layer for layer in kinds.values() if isinstance(layer, Conv2DBnAct) and layer.has_bn
    ]
    assert len(conv_bn_act) == 2  # both conv + BN; only the first also has its ReLU
    assert sorted(keras.activations.serialize(layer.activation) for layer in conv_bn_act) == [
        "linear",
        "relu",
    ]
    # The Add's ReLU stays (not after a conv); the conv feeding two layers keeps them.
    assert sum(isinstance(layer, L.ReLU) for layer in fused.layers) == 2
    assert sum(isinstance(layer, L.BatchNormalization) for layer in fused.layers) == 0
    dense = [layer for layer in fused.layers if isinstance(layer, DenseBnAct)][0]
    assert keras.activations.serialize(dense.activation) == "softmax"


def test_bn_after_an_activated_conv_becomes_its_own_affine_layer():
    model = randomize_bns(
        keras.Sequential(
            [keras.Input((6, 6, 2)), L.Conv2D(3, 3, activation="relu"), L.BatchNormalization()]
        ),
        np.random.default_rng(3),
    )
    fused = kq.fuse(model)
    assert [type(layer).__name__ for layer in fused.layers] == [
        "InputLayer",
        "Conv2DBnAct",
        "DepthwiseConv2DBnAct",
    ]
    assert fused.layers[2].has_bn and fused.layers[2].trainable
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(fused(x), model(x), rtol=1e-6, atol=1e-6)


def test_plain_models_convert_train_save_and_load(tmp_path):
    rng = np.random.default_rng(2)
    model = randomize_bns(plain_sequential(), rng)
    qat_model = kq.convert_quant_network(model, quant_delay=100, bn_fold=True)
    # Leaky ReLU and sigmoid are not fused by integer kernels: quantized before and after.
    activations = [layer for layer in qat_model.layers if isinstance(layer, L.Activation)]
    assert len(activations) == 2
    for layer in activations:
        index = qat_model.layers.index(layer)
        assert isinstance(qat_model.layers[index - 1], kq.FakeQuant)
        assert isinstance(qat_model.layers[index + 1], kq.FakeQuant)
    x = rng.standard_normal((8, 10, 10, 3)).astype("float32")
    # Still delayed: the folded quantization network computes the original.
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5
    )
    qat_model.compile(optimizer="sgd", loss="mse")
    qat_model.train_on_batch(x, rng.standard_normal((8, 3)).astype("float32"))
    path = str(tmp_path / "plain.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )


def test_unsupported_layers_are_still_listed():
    inputs = keras.Input((8, 8, 3))
    x = L.UnitNormalization(name="norm")(inputs)
    outputs = L.Dense(2)(L.Flatten()(x))
    with pytest.raises(ValueError, match="'norm' \\(UnitNormalization\\)"):
        kq.convert_quant_network(keras.Model(inputs, outputs))


def image_patterns(activation="swish"):
    """Rescaling / Normalization at the input, separable, depthwise, SE
    block with a broadcast Multiply, pre-activation BatchNorm, pooling,
    padding, cropping, Keras operations and a softmax output."""
    inputs = keras.Input((16, 16, 3))
    x = L.Rescaling(1 / 127.5, offset=-1, name="rescale")(inputs)
    x = L.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.5, 2.0, 0.5], name="norm")(x)
    x = L.ZeroPadding2D(1)(x)
    x = L.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    x = L.ReLU(6.0)(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.Activation("hard_swish")(x)
    se = L.Reshape((1, 1, 8))(L.GlobalAveragePooling2D()(x))
    se = L.Conv2D(4, 1, activation="relu")(se)
    se = L.Conv2D(8, 1)(se)
    se = L.ReLU(6.0)(se + 3.0) * (1.0 / 6.0)  # Keras operations, as in MobileNetV3
    x = L.Multiply()([x, se])
    h = L.SeparableConv2D(8, 3, padding="same", use_bias=False, name="sep")(x)
    h = L.BatchNormalization()(h)
    h = L.Activation(activation)(h)
    x = L.Add()([x, h])
    pre = L.BatchNormalization(name="pre_bn")(x)  # follows no conv: a per-channel affine op
    pre = L.ReLU()(pre)
    pre = L.Conv2D(8, 3, padding="same")(pre)
    x = L.Subtract()([x, pre])
    x = L.AveragePooling2D(2, name="average_pooling")(x)
    x = L.Cropping2D(1)(x)
    x = L.Dropout(0.1)(x)
    x = L.Flatten()(x)
    outputs = L.Dense(5, activation="softmax", name="logits")(x)
    return keras.Model(inputs, outputs)


def test_image_patterns_fuse_exactly():
    rng = np.random.default_rng(4)
    model = randomize_bns(image_patterns(), rng)
    x = rng.uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    fused = kq.fuse(model)
    kinds = [type(layer).__name__ for layer in fused.layers]
    assert "BatchNormalization" not in kinds and "SeparableConv2D" not in kinds
    assert (
        kinds.count("DepthwiseConv2DBnAct") == 5
    )  # rescaling, normalization, depthwise, separable, BN
    layers = {layer.name: layer for layer in fused.layers}
    assert not layers["rescale"].trainable and not layers["norm"].trainable
    assert layers["pre_bn"].has_bn and layers["pre_bn"].trainable
    assert keras.activations.serialize(layers["pre_bn"].activation) == "relu"
    assert layers["sep_depthwise"].depthwise.kernel.shape == (3, 3, 8, 1)
    assert layers["sep"].conv.kernel.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(
        fused.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_inverted_normalization_and_per_channel_rescaling_fuse_exactly():
    rng = np.random.default_rng(5)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 3)),
            L.Normalization(mean=[1.0, -2.0, 0.5], variance=[4.0, 0.25, 1.0], invert=True),
            L.Rescaling([0.5, 2.0, -1.0], offset=[0.0, 1.0, 3.0]),
            L.BatchNormalization(),
        ]
    )
    randomize_bns(model, rng)
    fused = kq.fuse(model)
    assert [type(layer).__name__ for layer in fused.layers] == ["InputLayer"] + [
        "DepthwiseConv2DBnAct"
    ] * 3
    x = rng.standard_normal((3, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_skipped_layers_are_not_fused():
    model = plain_sequential()
    fused = kq.fuse(model, skip_layers=[model.layers[1].name, L.Dense])
    kinds = [type(layer).__name__ for layer in fused.layers]
    assert kinds[:5] == ["InputLayer", "Conv2DBnAct", "BatchNormalization", "ReLU", "Conv2DBnAct"]
    assert "DenseBnAct" not in kinds


def test_fusion_keeps_regularizers_constraints_and_dtype():
    rng = np.random.default_rng(6)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(
        4,
        3,
        kernel_regularizer=keras.regularizers.L2(0.1),
        kernel_constraint=keras.constraints.MaxNorm(0.5, axis=[0, 1, 2]),
        name="conv",
    )(inputs)
    x = L.BatchNormalization(
        gamma_regularizer=keras.regularizers.L2(0.2),
        beta_regularizer=keras.regularizers.L1(0.3),
        beta_constraint=keras.constraints.NonNeg(),
    )(x)
    x = L.Dense(3, dtype="float64", name="wide")(L.Flatten()(L.ReLU()(x)))
    outputs = L.Dense(2, activity_regularizer=keras.regularizers.L2(0.4))(x)
    model = keras.Model(inputs, outputs)
    x_data = rng.uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    model(x_data)
    fused = kq.fuse(model)
    fused(x_data)
    assert len(fused.losses) == len(model.losses) == 4
    np.testing.assert_allclose(
        sorted(float(v) for v in fused.losses), sorted(float(v) for v in model.losses), rtol=1e-5
    )
    conv = fused.get_layer("conv")
    assert isinstance(conv.conv.kernel_constraint, keras.constraints.MaxNorm)
    assert isinstance(conv.bn.beta_constraint, keras.constraints.NonNeg)
    assert fused.get_layer("wide").dtype_policy.name == "float64"
    qat_model = kq.convert_quant_network(
        model, per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False]
    )
    qat_model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    for _ in range(3):
        qat_model.train_on_batch(x_data, np.ones((4, 2)))
    kernel = qat_model.get_layer("conv").conv.kernel.numpy()
    assert np.sqrt((kernel**2).sum(axis=(0, 1, 2))).max() <= 0.5 + 1e-5  # the constraint acted


def test_activity_regularizer_keeps_a_layer_from_absorbing_what_follows():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activity_regularizer=keras.regularizers.L2(0.1))(inputs)
    x = L.BatchNormalization()(x)
    model = keras.Model(inputs, x)
    fused = kq.fuse(model)
    x_data = np.random.default_rng(7).uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(fused(x_data), model(x_data), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(fused.losses[0]), float(model.losses[0]), rtol=1e-5)


def test_fuse_refuses_a_quantization_network():
    inputs = keras.Input((4,))
    qat = kq.convert_quant_network(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    with pytest.raises(ValueError, match="already a quantization network.*`fuse` takes"):
        kq.fuse(qat)


def test_a_dilated_transposed_convolution_is_refused_with_the_reason():
    inputs = keras.Input((6, 6, 3))
    outputs = keras.layers.Conv2DTranspose(4, 3, dilation_rate=2, name="up")(inputs)
    with pytest.raises(ValueError, match=r"'up' \(Conv2DTranspose: dilation_rate=\(2, 2\)"):
        kq.convert_quant_network(keras.Model(inputs, outputs))
