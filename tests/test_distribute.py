"""tf.distribute: the distributed result equals the single-device one.

conftest.py splits the CPU into two logical devices for MirroredStrategy.
"""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from worker_ports import run_workers

import keras_qat as kq
from conftest import mirrored_strategy
from keras_qat import Conv2DBnAct, DenseBnAct, FakeQuant

HERE = os.path.dirname(os.path.abspath(__file__))


def build_qat_model():
    """Folded synchronized BatchNorm (conv and depthwise), plain conv, Add,
    shared-range average pooling, Dense: every kind of state."""
    inputs = keras.Input((8, 8, 3))
    a = Conv2DBnAct(4, 3, padding="same", has_bn=True, synchronized=True, activation="relu")(inputs)
    a = kq.DepthwiseConv2DBnAct(3, padding="same", has_bn=True, synchronized=True)(a)
    b = Conv2DBnAct(4, 1)(inputs)
    x = keras.layers.AveragePooling2D(2)(keras.layers.Add()([a, b]))
    x = keras.layers.Flatten()(x)
    outputs = DenseBnAct(3)(x)
    return kq.convert_quant_network(
        keras.Model(inputs, outputs), quant_delay=2, freeze_bn=3, per_channel=[True, False]
    )


def batches(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((size, 8, 8, 3)).astype("float32") * (i + 1),
            rng.standard_normal((size, 3)).astype("float32"),
        )
        for i in range(n)
    ]


def trained(strategy, initial_weights, data):
    with strategy.scope():
        model = build_qat_model()
        model.set_weights(initial_weights)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for x, y in data:
        model.train_on_batch(x, y)
    return model


def state(model):
    return [np.array(v.numpy()) for v in model.weights]


def assert_same_state(got, expected):
    for index, (g, e) in enumerate(zip(got, expected)):
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-6, err_msg=f"weight {index}")


def test_mirrored_equals_single_device_and_replicas_agree():
    initial = build_qat_model().get_weights()
    data = batches(5)
    single = trained(tf.distribute.get_strategy(), initial, data)
    mirrored = trained(mirrored_strategy(), initial, data)
    assert mirrored.distribute_strategy.num_replicas_in_sync == 2
    assert_same_state(state(mirrored), state(single))
    fake_quants = [layer for layer in mirrored.layers if isinstance(layer, FakeQuant)]
    assert fake_quants and all(layer.step.numpy() == 5 for layer in fake_quants)
    for variable in mirrored.weights:
        copies = [np.array(v.numpy()) for v in variable.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)


def test_ranges_are_those_of_the_global_batch():
    # Shards with very different values: the range must cover both.
    with mirrored_strategy().scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, FakeQuant(ema=False)(inputs))
        model.compile(optimizer="sgd", loss="mse")
    x = np.concatenate([np.full((4, 4), -1.0), np.full((4, 4), 3.0)]).astype("float32")
    model.train_on_batch(x, x)
    layer = model.layers[1]
    assert (layer.min.numpy(), layer.max.numpy(), layer.step.numpy()) == (-1.0, 3.0, 1)


def test_checkpoint_from_two_replicas_resumes_on_one(tmp_path):
    initial = build_qat_model().get_weights()
    data = batches(6, seed=1)
    straight = trained(tf.distribute.get_strategy(), initial, data)
    mirrored = trained(mirrored_strategy(), initial, data[:3])
    path = str(tmp_path / "mirrored.keras")
    mirrored.save(path)
    resumed = keras.saving.load_model(path)
    assert resumed.distribute_strategy.num_replicas_in_sync == 1
    for x, y in data[3:]:
        resumed.train_on_batch(x, y)
    assert_same_state(state(resumed), state(straight))


@pytest.mark.slow
def test_multi_worker_mirrored_equals_single_device(tmp_path):
    script = os.path.join(HERE, "multi_worker_train.py")
    codes, logs = run_workers(
        lambda index: [sys.executable, script, str(tmp_path / f"worker{index}.npz")],
        timeout=240,
        env=dict(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=HERE),
    )
    for code, log in zip(codes, logs):
        assert code == 0, log[-3000:]
    import multi_worker_train

    single = multi_worker_train.train(tf.distribute.get_strategy())  # one device, same loop
    for index in range(2):
        got = np.load(tmp_path / f"worker{index}.npz")
        assert_same_state([got[f"w{i}"] for i in range(len(got.files))], single)
