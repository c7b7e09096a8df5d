import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qat import Conv2DBnAct, DenseBnAct, FakeQuant, convert_quant_network
from keras_qat.quantizers import nudged_range, quant_range


def small_qat_model(quant_delay=1):
    inputs = keras.Input((10, 10, 2), name="image")
    x = Conv2DBnAct(4, 3, has_bn=True, activation="relu")(inputs)
    shortcut = Conv2DBnAct(4, 3)(inputs)
    x = keras.layers.Add()([x, shortcut])
    x = keras.layers.Flatten()(x)
    outputs = DenseBnAct(3)(x)
    return convert_quant_network(
        keras.Model(inputs, outputs), quant_delay=quant_delay, per_channel=[True, False]
    )


def batches(n):
    rng = np.random.default_rng(7)
    return [
        (
            rng.standard_normal((8, 10, 10, 2)).astype("float32"),
            rng.standard_normal((8, 3)).astype("float32"),
        )
        for _ in range(n)
    ]


def compile_model(model, jit_compile=False):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=jit_compile)
    return model


def state(model):
    """Every FakeQuant range / step counter and every weight, in order."""
    return {f"{i}:{v.name}": np.array(v.numpy()) for i, v in enumerate(model.weights)}


def test_keras_round_trip_and_resumed_training_is_uninterrupted(tmp_path):
    data = batches(6)
    straight = compile_model(small_qat_model())
    resumed = compile_model(small_qat_model())
    resumed.set_weights(straight.get_weights())
    for x, y in data:
        straight.train_on_batch(x, y)
    for x, y in data[:3]:
        resumed.train_on_batch(x, y)
    path = str(tmp_path / "qat.keras")
    resumed.save(path)
    loaded = keras.saving.load_model(path)
    x_test = data[0][0]
    np.testing.assert_array_equal(
        loaded.predict(x_test, verbose=0), resumed.predict(x_test, verbose=0)
    )
    loaded_state, resumed_state = state(loaded), state(resumed)
    assert loaded_state.keys() == resumed_state.keys()
    for key in resumed_state:
        np.testing.assert_array_equal(loaded_state[key], resumed_state[key], err_msg=key)
    assert sum(key.endswith(":step") and value == 3 for key, value in loaded_state.items()) == 8
    for x, y in data[3:]:
        loaded.train_on_batch(x, y)
    final, expected = state(loaded), state(straight)
    for key in expected:
        np.testing.assert_allclose(final[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_saved_model_export_round_trip(tmp_path):
    model = compile_model(small_qat_model())
    for x, y in batches(3):
        model.train_on_batch(x, y)
    path = str(tmp_path / "saved_model")
    model.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    x = batches(1)[0][0]
    np.testing.assert_allclose(reloaded.serve(x), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    saved = {v.name.split(":")[0]: v.numpy() for v in reloaded.variables}
    for layer in model.layers:
        if isinstance(layer, FakeQuant):
            for variable in (layer.min, layer.max, layer.step):
                matches = [
                    k
                    for k in saved
                    if k.endswith(variable.name) and np.array_equal(saved[k], variable.numpy())
                ]
                assert matches, variable.path


def grid_step(model):
    layer = [layer for layer in model.layers if isinstance(layer, FakeQuant)][-1]
    lo, hi = quant_range(layer.min.numpy(), layer.max.numpy())
    return float(nudged_range(lo, hi)[2])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_under_tf_function_and_xla(jit_compile):
    data = batches(4)
    model = compile_model(small_qat_model(quant_delay=1), jit_compile=jit_compile)
    x = np.concatenate([b[0] for b in data])
    y = np.concatenate([b[1] for b in data])
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(layer.step.numpy() == 8 for layer in model.layers if isinstance(layer, FakeQuant))
    # Inference: XLA and the TF graph agree within one quantization step.
    graph = model.predict(x, verbose=0)
    xla = tf.function(lambda t: model(t, training=False), jit_compile=True)(x).numpy()
    assert np.max(np.abs(graph - xla)) <= grid_step(model) * 1.001


def test_import_fails_clearly_on_another_backend():
    # Installing a second backend only for this test would be heavy; Keras is
    # made to report "jax" instead, which is what keras_qat checks.
    code = "import keras; keras.config.backend = lambda: 'jax'; import keras_qat"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "TensorFlow backend" in result.stderr and "'jax'" in result.stderr
