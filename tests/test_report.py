"""quant_report and sensitivity: where quantization hurts."""

import json
import os
import sys

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.layers.call_context import quantization_bypassed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import models  # noqa: E402

L = keras.layers


def digits(n, seed):
    """Noisy digit-like images: class k is a faint bar at row 2k + 3 (hard
    enough that damaged weights cost accuracy)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.uniform(0, 0.8, (n, 28, 28, 1)).astype("float32")
    for i, label in enumerate(labels):
        images[i, 2 * label + 3 : 2 * label + 5, 4:24] += 0.28
    return images, labels


@pytest.fixture(scope="module")
def damaged_lenet():
    """A trained LeNet-5 and its quantization network, with conv2's
    weights damaged to 2 bits after training."""
    keras.utils.set_random_seed(3)
    x, y = digits(1024, 0)
    network = models.lenet5()
    network.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    network.fit(x, y, epochs=2, batch_size=64, verbose=0)
    qat = kq.convert_quant_network(network)
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    qat.fit(x[:256], np.zeros((256, 10)), batch_size=64, verbose=0)  # sets the ranges
    qat.get_layer("conv2").weight_quantizer.num_bits = 2
    x_test, y_test = digits(256, 1)
    return network, qat, x_test, y_test


def test_quant_report_ranks_the_damaged_layer_lowest(damaged_lenet):
    network, qat, x, _ = damaged_lenet
    report = kq.quant_report(qat, x, float_model=network)
    assert report.ranked()[0]["tensor"] == "conv2/kernel"
    row = {r["tensor"]: r for r in report.rows}
    assert row["conv2/kernel"]["num_bits"] == 2 and row["conv2/kernel"]["grid_used"] == 1.0
    assert row["conv1/kernel"]["local_sqnr_db"] > row["conv2/kernel"]["local_sqnr_db"] + 15
    # Downstream tensors inherit the damage, upstream ones do not.
    assert row["conv2_quant"]["sqnr_db"] < row["conv1_quant"]["sqnr_db"] - 10


def test_quant_report_rows_are_in_graph_order_with_every_column(damaged_lenet):
    _, qat, x, _ = damaged_lenet
    report = kq.quant_report(qat, x, batch_size=100)
    order = [row["tensor"] for row in report.rows]
    assert order[:4] == ["image_quant", "conv1/kernel", "conv1_quant", "conv2/kernel"]
    assert order[-1] == "fc3_quant" and len(order) == 11  # 5 kernels, 6 activation grids
    columns = report.columns()
    assert list(columns) == list(kq.report_table.COLUMNS) and all(
        len(v) == 11 for v in columns.values()
    )
    assert json.loads(report.to_json())[0]["tensor"] == "image_quant"
    table = str(report).splitlines()
    assert len(table) == 12 and all(name in str(report) for name in order)
    first = report.rows[0]  # the input: images in [0, 1.08], 8 bits, asymmetric
    assert first["zero_point"] == -128 and first["min"] == 0.0 and first["clipped"] < 0.01


def test_quant_report_sqnr_against_an_independent_numpy_computation(damaged_lenet):
    _, qat, x, _ = damaged_lenet
    row = kq.quant_report(qat, x).rows[1]  # conv1/kernel
    layer = qat.get_layer("conv1")
    kernel = layer.kernel().numpy()
    bound = np.abs(kernel).max(axis=(0, 1, 2))  # symmetric, per channel, narrow grid
    scale = bound / 127
    quantized = np.clip(np.floor(kernel / scale + 0.5), -127, 127) * scale
    expected = 10 * np.log10(np.sum(kernel**2.0) / np.sum((quantized - kernel) ** 2.0))
    np.testing.assert_allclose(row["local_sqnr_db"], expected, rtol=1e-3)


def test_quant_report_compares_with_the_tflite_model_tensor_by_tensor(damaged_lenet, tmp_path):
    _, qat, x, _ = damaged_lenet
    path = tmp_path / "lenet.tflite"
    kq.export_tflite(qat, path)
    report = kq.quant_report(qat, x[:64], tflite_model=str(path))
    rows = {row["tensor"]: row for row in report.rows}
    assert rows["image_quant"]["tflite_exact"] == 1.0
    assert rows["conv1_quant"]["tflite_exact"] >= 0.99
    # TFLite's reference kernels (every tensor kept, no XNNPACK) round some
    # requantizations differently: exact on most values, never off by more
    # than a step in these layers.
    for name in ("conv1_quant", "conv2_quant", "fc1_quant"):
        assert rows[name]["tflite_exact"] >= 0.9 and rows[name]["tflite_max_steps"] <= 1, rows[name]
    assert rows["conv1/kernel"]["tflite_exact"] is None


def test_sensitivity_names_the_damaged_layer_first(damaged_lenet):
    _, qat, x, y = damaged_lenet
    result = kq.sensitivity(qat, x, y, verbose=0)
    assert result.rows[0]["group"] == "conv2"
    assert result.float_metric - result.quantized_metric > 0.05
    assert result.suggested_skip_layers[0] == "conv2"
    assert result.suggested_metric >= result.float_metric - 0.005
    assert "suggested skip_layers: ['conv2'" in str(result)


def test_report_plot_writes_a_png(damaged_lenet, tmp_path):
    from matplotlib import image

    _, qat, x, _ = damaged_lenet
    path = tmp_path / "report.png"
    kq.quant_report(qat, x[:64]).plot(path)
    pixels = image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # not blank
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 200  # the damaged layer's bar is highlighted


def test_bypassed_quantizers_compute_the_float_network(damaged_lenet):
    network, qat, x, _ = damaged_lenet
    with quantization_bypassed():
        bypassed = qat(x[:32], training=False)
    np.testing.assert_allclose(bypassed, network(x[:32]), rtol=1e-4, atol=1e-4)
    assert not np.allclose(qat(x[:32], training=False), network(x[:32]), atol=1e-3)


def test_report_and_sensitivity_on_multiple_inputs_outputs_and_skipped_layers():
    a, b = keras.Input((6,), name="a"), keras.Input((5,), name="b")
    h = L.Concatenate(name="concat")([L.Dense(8, name="da")(a), L.Dense(8, name="db")(b)])
    out1 = L.Dense(3, name="head")(L.ReLU(name="relu")(h))
    out2 = L.Dense(2, name="float_head")(h)
    model = keras.Model({"a": a, "b": b}, [out1, out2])
    qat = kq.convert_quant_network(model, skip_layers=["float_head"])
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(64, 6)).astype("f4"), "b": rng.normal(size=(64, 5)).astype("f4")}
    qat(x, training=True)
    report = kq.quant_report(qat, x, float_model=model)
    tensors = [row["tensor"] for row in report.rows]
    assert tensors.index("da/kernel") < tensors.index("concat") < tensors.index("head/kernel")
    assert "float_head/kernel" not in tensors
    assert all(row["sqnr_db"] is not None for row in report.rows if row["tensor"] == "concat")

    def agreement(y_true, y_pred):
        return float(np.mean(y_pred[0].argmax(-1) == y_true))

    labels = model(x)[0].numpy().argmax(-1)
    result = kq.sensitivity(qat, x, labels, metric=agreement, verbose=0)
    assert {row["group"] for row in result.rows} >= {"a", "b", "da", "db", "concat", "head"}
    with pytest.raises(ValueError, match="mode"):
        kq.sensitivity(qat, x, labels, metric=agreement, mode="up", verbose=0)
    with pytest.raises(ValueError, match="unknown group"):
        kq.sensitivity(qat, x, labels, metric=agreement, layers=["nope"], verbose=0)


def _events(log_dir):
    import tensorflow as tf

    values = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = (
                    tf.make_ndarray(value.tensor)
                    if value.HasField("tensor")
                    else value.simple_value
                )
                values.setdefault(value.tag, []).append((event.step, float(number)))
    return values


def test_range_logger_writes_ranges_to_tensorboard(tmp_path):
    inputs = keras.Input((6,), name="features")
    model = keras.Model(
        inputs, L.Dense(3, name="head")(L.Dense(4, activation="relu", name="h")(inputs))
    )
    qat = kq.convert_quant_network(model)
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    qat.compile(optimizer="sgd", loss="mse")
    logger = kq.callbacks.QuantRangeLogger(tmp_path, x=x[:16])
    qat.fit(x, np.zeros((64, 3)), epochs=3, batch_size=16, verbose=0, callbacks=[logger])
    events = _events(tmp_path)
    assert [step for step, _ in events["h_quant/max"]] == [0, 1, 2]
    np.testing.assert_allclose(events["h_quant/max"][-1][1], qat.get_layer("h_quant").max.numpy())
    assert events["h_quant/min"][-1][1] == 0.0  # after a ReLU
    assert {"head/kernel/scale", "features_quant/clipped"} <= set(events)


def test_range_logger_warns_of_a_collapsed_range(tmp_path):
    inputs = keras.Input((4,))
    dead = L.Dense(
        3, activation="relu", bias_initializer=keras.initializers.Constant(-50.0), name="dead"
    )
    qat = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(dead(inputs))))
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.random.default_rng(0).uniform(0, 1, (16, 4)).astype("float32")
    logger = kq.callbacks.QuantRangeLogger(tmp_path, every_n_epochs=2)
    with pytest.warns(UserWarning, match="'dead_quant' has collapsed"):
        qat.fit(x, np.zeros((16, 2)), epochs=2, verbose=0, callbacks=[logger])
    with pytest.raises(ValueError, match="every_n_epochs"):
        kq.callbacks.QuantRangeLogger(tmp_path, every_n_epochs=0)


def test_range_logger_says_what_to_install_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    with pytest.raises(ImportError, match=r"keras-qat\[tensorboard\]"):
        kq.callbacks.QuantRangeLogger(tmp_path)


def test_range_logger_warns_of_a_range_that_clips_the_samples(tmp_path):
    inputs = keras.Input((4,), name="small")
    qat = kq.convert_quant_network(keras.Model(inputs, L.Dense(2, name="out")(inputs)))
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype("float32")
    logger = kq.callbacks.QuantRangeLogger(tmp_path, x=10 * x, warn_clipped=0.05)
    with pytest.warns(UserWarning, match=r"'small_quant' clips \d+\.\d% of the sample values"):
        qat.fit(x, np.zeros((16, 2)), epochs=1, verbose=0, callbacks=[logger])


def small_qat_model(train=True):
    inputs = keras.Input((6,), name="x")
    hidden = L.Dense(8, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(hidden))
    qat = kq.convert_quant_network(model)
    x = np.random.default_rng(0).normal(size=(40, 6)).astype("float32")
    if train:
        qat(x, training=True)
    return model, qat, x


def test_sensitivity_refuses_a_metric_that_is_not_finite():
    _, qat, x = small_qat_model()
    with pytest.raises(ValueError, match="The metric is nan"):
        kq.sensitivity(qat, x, np.zeros(40, int), metric=lambda y, p: float("nan"), verbose=0)


def test_sensitivity_refuses_targets_of_another_length_or_shape():
    _, qat, x = small_qat_model()
    with pytest.raises(ValueError, match=r"targets `y` for \[1\] rows and inputs `x` for 40"):
        kq.sensitivity(qat, x, np.zeros(1, int), verbose=0)
    with pytest.raises(ValueError, match=r"one-hot targets of the outputs' shape \(40, 3\)"):
        kq.sensitivity(qat, x, np.zeros((40, 5)), verbose=0)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        kq.sensitivity(qat, x, np.full(40, 7), verbose=0)


def test_sensitivity_and_quant_report_refuse_a_float_model():
    model, _, x = small_qat_model()
    with pytest.raises(ValueError, match="has no quantizers"):
        kq.sensitivity(model, x, np.zeros(40, int), verbose=0)
    with pytest.raises(ValueError, match="has no quantizers"):
        kq.quant_report(model, x)


def test_quant_report_refuses_a_batch_size_that_is_not_positive():
    _, qat, x = small_qat_model()
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        kq.quant_report(qat, x, batch_size=0)


def test_quant_report_warns_of_an_untrained_model():
    _, qat, x = small_qat_model(train=False)
    with pytest.warns(UserWarning, match="have no range yet"):
        kq.quant_report(qat, x)


def test_quant_report_refuses_another_models_tflite_model():
    _, qat, x = small_qat_model()
    inputs = keras.Input((6,), name="other_input")  # no tensor named as the model's
    other = kq.convert_quant_network(keras.Model(inputs, L.Dense(4, name="other")(inputs)))
    other(x, training=True)
    with pytest.raises(ValueError, match="is not an export of model"):
        kq.quant_report(qat, x, tflite_model=kq.export_tflite(other))


def test_range_logger_checks_its_arguments_and_samples_before_training(tmp_path):
    with pytest.raises(ValueError, match="Received: log_dir=None"):
        kq.callbacks.QuantRangeLogger(None)
    model, qat, x = small_qat_model()
    logger = kq.callbacks.QuantRangeLogger(str(tmp_path), x=np.zeros((4, 7), "float32"))
    qat.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"does not fit the model's inputs"):
        qat.fit(x, np.zeros((40, 3)), epochs=1, verbose=0, callbacks=[logger])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match="has no quantizers"):
        model.fit(
            x, np.zeros((40, 3)), verbose=0, callbacks=[kq.callbacks.QuantRangeLogger(tmp_path)]
        )


class PrependToken(keras.layers.Layer):
    """A learned token tiled to the batch and put before the sequence (a
    ViT's class token): traced as a WeightOperand broadcast to the batch."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal")

    def call(self, x):
        token = keras.ops.tile(self.token, (keras.ops.shape(x)[0], 1, 1))
        return keras.ops.concatenate([token, x], axis=1)


def test_quant_report_compares_a_sequence_with_a_batch_broadcast_token():
    """A constant broadcast to the batch (a ViT's class token) has a TFLite
    row per input: the report counted its FakeQuant's one row once per TFLite
    row (6400 % exact on a keras-hub ViT's class token). The token is now
    stored on the concatenation's grid: no row of its own, and no row over
    100 %."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    x = L.Dense(8)(PrependToken()(L.Dense(8)(inputs)))
    model = keras.Model(inputs, L.Dense(3)(L.GlobalAveragePooling1D()(x)))
    x = np.random.default_rng(0).normal(size=(16, 4, 8)).astype("float32")
    qat = kq.convert_quant_network(model)
    qat(x, training=True)
    rows = kq.quant_report(qat, x, tflite_model=kq.export_tflite(qat)).rows
    compared = {row["tensor"]: row for row in rows if row["tflite_exact"] is not None}
    assert all(row["tflite_exact"] <= 1.0 for row in compared.values()), compared
    assert not any("token" in name for name in compared), list(compared)
