"""Nested models are inlined; `skip_layers` keeps chosen layers in float;
Keras operations on tensors are quantized or reported."""

import keras
import numpy as np
import pytest
from test_fuse import randomize_bns

import keras_qat as kq
from keras_qat.export.interpreter import tflite_interpreter, tflite_ops
from keras_qat.transforms.inline import inline_nested_models

L = keras.layers
EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])


def backbone():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    block = keras.Sequential(
        [
            keras.Input((8, 8, 6)),
            L.Conv2D(6, 3, padding="same", name="head"),
            L.BatchNormalization(),
        ],
        name="block",
    )
    x = L.ReLU()(L.Add()([x, block(x)]))
    return keras.Model(inputs, x, name="backbone")


def classifier():
    inputs = keras.Input((8, 8, 3))
    features = backbone()(inputs)
    x = L.GlobalAveragePooling2D()(features)
    outputs = L.Dense(4, name="head")(x)  # the same name as a layer inside
    return keras.Model(inputs, outputs, name="classifier")


def test_nested_models_are_inlined_with_their_weights():
    rng = np.random.default_rng(0)
    model = randomize_bns(classifier(), rng)
    flat = inline_nested_models(model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    names = [layer.name for layer in flat.layers]
    assert "head" in names and "block_head" in names  # the inner one is renamed
    assert len(names) == len(set(names))
    x = rng.standard_normal((4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        flat.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    assert inline_nested_models(flat) is flat


def test_a_shared_nested_model_stays_shared():
    inner = keras.Sequential([keras.Input((5,)), L.Dense(3, name="shared")], name="tower")
    a, b = keras.Input((5,)), keras.Input((5,))
    model = keras.Model([a, b], L.Subtract()([inner(a), inner(b)]))
    flat = inline_nested_models(model)
    dense = [layer for layer in flat.layers if isinstance(layer, L.Dense)]
    assert len(dense) == 1 and len(flat.weights) == len(model.weights)
    x = [np.ones((2, 5), "float32"), np.arange(10, dtype="float32").reshape(2, 5)]
    np.testing.assert_allclose(flat(x), model(x), rtol=1e-6)


def test_nested_model_converts_trains_saves_and_exports(tmp_path):
    rng = np.random.default_rng(1)
    model = randomize_bns(classifier(), rng)
    qat_model = kq.convert_quant_network(model, **EXPORTABLE)
    kinds = [type(layer).__name__ for layer in qat_model.layers]
    assert kinds.count("QuantConv2DBnFoldAct") == 2 and "Sequential" not in kinds
    x = rng.uniform(-1, 1, (64, 8, 8, 3)).astype("float32")
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    qat_model.fit(x, rng.standard_normal((64, 4)).astype("float32"), epochs=1, verbose=0)
    path = str(tmp_path / "nested.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))
    report = kq.compare_tflite(loaded, kq.export_tflite(loaded), x)
    assert report["within_one_step"] >= 0.99 and report["max_diff_steps"] <= 2.001, report


def small_model():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, name="conv_a")(inputs)
    x = L.UnitNormalization(name="norm")(x)  # no integer kernel
    x = L.Conv2D(4, 1, activation="relu", name="conv_b")(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


@pytest.mark.parametrize(
    "skip", ["norm", [L.UnitNormalization], lambda layer: layer.name == "norm"]
)
def test_skipped_layer_stays_float_between_fake_quants(skip):
    model = small_model()
    qat_model = kq.convert_quant_network(model, skip_layers=skip, **EXPORTABLE)
    names = [layer.name for layer in qat_model.layers]
    norm = qat_model.get_layer("norm")
    assert type(norm) is L.UnitNormalization
    assert names[names.index("norm") + 1] == "norm_quant"  # a quantized layer uses it
    for weight, original in zip(norm.weights, model.get_layer("norm").weights):
        np.testing.assert_array_equal(weight, original)


def test_skipped_conv_keeps_its_float_weights_and_export_names_the_float_ops():
    rng = np.random.default_rng(2)
    model = small_model()
    qat_model = kq.convert_quant_network(model, skip_layers=["norm", "conv_b"], **EXPORTABLE)
    conv_b = qat_model.get_layer("conv_b")
    assert type(conv_b) is L.Conv2D  # neither fused nor quantized
    np.testing.assert_array_equal(conv_b.kernel, model.get_layer("conv_b").kernel)
    x = rng.uniform(-1, 1, (32, 6, 6, 2)).astype("float32")
    qat_model.compile(optimizer="sgd", loss="mse")
    qat_model.train_on_batch(x, rng.standard_normal((32, 3)).astype("float32"))
    with pytest.raises(ValueError, match="float compute ops"):
        kq.export_tflite(qat_model)
    tflite_bytes = kq.export_tflite(qat_model, allow_float_ops=True)
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    # Between two float ops the converter drops the rounding of the
    # FakeQuant, so agreement is looser than in an all-integer model.
    assert report["top1_agreement_unambiguous"] == 1.0 and report["max_diff_steps"] <= 4.001, report


def test_bad_skip_layers_are_reported():
    with pytest.raises(ValueError, match="no layer named 'nope'.*conv_a"):
        kq.convert_quant_network(small_model(), skip_layers=["norm", "nope"])
    with pytest.raises(ValueError, match="skip_layers"):
        kq.convert_quant_network(small_model(), skip_layers=[3])
    with pytest.raises(ValueError, match="'norm' \\(UnitNormalization\\)"):
        kq.convert_quant_network(small_model())


def lambda_model():
    inputs = keras.Input((4,))
    x = L.Dense(3, name="dense")(inputs)
    x = L.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(x)
    return keras.Model(inputs, L.Dense(2, name="head")(x))


def test_a_lambda_layer_is_listed_or_skipped_and_stays_as_it_is():
    model = lambda_model()
    with pytest.raises(ValueError, match=r"'affine' \(Lambda\).*skip_layers"):
        kq.convert_quant_network(model)
    fused = kq.fuse(model, skip_layers=["affine"])
    x = np.random.default_rng(4).uniform(-1, 1, (8, 4)).astype("float32")
    np.testing.assert_allclose(fused(x), model(x), rtol=1e-6)
    qat_model = kq.convert_quant_network(model, skip_layers=["affine"], **EXPORTABLE)
    assert qat_model.get_layer("affine").function is model.get_layer("affine").function
    qat_model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for _ in range(2):
        qat_model.train_on_batch(x, np.zeros((8, 2)))
    report = kq.compare_tflite(qat_model, kq.export_tflite(qat_model, allow_float_ops=True), x)
    assert report["within_one_step"] >= 0.99, report


def test_a_skipped_lstm_needs_select_tf_ops_and_says_so():
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(4, name="lstm")(inputs)))
    with pytest.raises(ValueError, match=r"'lstm' \(LSTM: recurrent"):
        kq.convert_quant_network(model)
    qat_model = kq.convert_quant_network(model, skip_layers=["lstm"], **EXPORTABLE)
    x = np.random.default_rng(5).uniform(-1, 1, (16, 5, 3)).astype("float32")
    qat_model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    qat_model.train_on_batch(x, np.zeros((16, 2)))
    with pytest.raises(ValueError, match="select_tf_ops=True"):
        kq.export_tflite(qat_model, allow_float_ops=True)
    tflite_bytes = kq.export_tflite(qat_model, allow_float_ops=True, select_tf_ops=True)
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False, allocate=False)
    names = {op["op_name"] for op in tflite_ops(interpreter)}
    assert any(name.startswith("Flex") for name in names) and "CONV_2D" in names  # the Dense


def test_keras_operations_are_quantized_or_listed():
    inputs = keras.Input((4,))
    x = L.Dense(4, name="first")(inputs)
    y = L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    model = keras.Model(inputs, L.Dense(2)(L.Multiply()([x, y])))
    qat_model = kq.convert_quant_network(model, **EXPORTABLE)
    consumers = {
        type(op).__name__: op._outbound_nodes[0].operation
        for op in qat_model.operations
        if not isinstance(op, L.Layer)
    }
    # `x + 3.0` feeds only a ReLU6, fused into its rounding (the FakeQuant
    # after it applies it); `* (1 / 6)` is rounded itself.
    assert {op: type(layer).__name__ for op, layer in consumers.items()} == {
        "Add": "FakeQuant",
        "Multiply": "FakeQuant",
    }
    assert (consumers["Add"].activation, consumers["Multiply"].activation) == ("relu6", None)
    x = np.random.default_rng(3).uniform(-6, 6, (256, 4)).astype("float32")
    qat_model.compile(optimizer="sgd", loss="mse")
    qat_model.train_on_batch(x, np.zeros((256, 2), "float32"))
    tflite_bytes = kq.export_tflite(qat_model)
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["within_one_step"] >= 0.99 and report["max_diff_steps"] <= 2.001, report

    outputs = L.Dense(2)(keras.ops.exp(L.Dense(4)(inputs)))
    with pytest.raises(ValueError, match="Keras operation Exp"):
        kq.convert_quant_network(keras.Model(inputs, outputs))
