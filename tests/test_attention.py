"""MultiHeadAttention: decomposed into its Dense projections and Keras
operations, with its weights, then quantized and exported to int8."""

import keras
import numpy as np
import pytest
from test_export import assert_integer_model, calibrate

import keras_qat as kq
from keras_qat.transforms.attention import decompose_attention

L = keras.layers


def encoder_block(sequence=6, width=16, heads=2, cross=False, **attention_args):
    """A transformer encoder block: attention, residual, LayerNorm, GELU MLP."""
    inputs = keras.Input((sequence, width))
    attention = L.MultiHeadAttention(heads, width // heads, name="attention", **attention_args)
    if cross:
        memory = keras.Input((sequence + 2, width))
        attended = attention(inputs, memory)
        model_inputs = [inputs, memory]
    else:
        attended = attention(inputs, inputs)
        model_inputs = inputs
    x = L.LayerNormalization()(L.Add()([inputs, attended]))
    mlp = L.Dense(width)(L.Dense(2 * width, activation="gelu")(x))
    outputs = L.LayerNormalization()(L.Add()([x, mlp]))
    return keras.Model(model_inputs, L.Dense(3)(L.GlobalAveragePooling1D()(outputs)))


def batch(model, n, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    x = [rng.normal(0, 1, (n,) + s).astype("float32") for s in shapes]
    return x if len(x) > 1 else x[0]


@pytest.mark.parametrize(
    "cross, attention_args",
    [(False, {}), (True, {}), (False, dict(value_dim=4, use_bias=False, output_shape=16))],
)
def test_decomposition_computes_what_the_layer_computes(cross, attention_args):
    model = encoder_block(cross=cross, **attention_args)
    x = batch(model, 8)
    decomposed = decompose_attention(model)
    names = [type(layer).__name__ for layer in decomposed.layers]
    assert "MultiHeadAttention" not in names and "Softmax" in names
    np.testing.assert_allclose(
        decomposed.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


def test_encoder_block_trains_saves_and_exports_to_int8(tmp_path):
    model = encoder_block()
    x = batch(model, 256, seed=1)
    qmodel = calibrate(kq.convert_quant_network(model), x, steps=3)
    path = str(tmp_path / "block.keras")
    qmodel.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))
    tflite_bytes = kq.export_tflite(loaded)
    assert_integer_model(
        tflite_bytes, ["FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "GELU", "RSQRT", "MEAN"]
    )
    report = kq.compare_tflite(loaded, tflite_bytes, x)
    assert report["max_diff_steps"] <= 3.001 and report["within_one_step"] >= 0.95, report


def test_attention_that_cannot_be_quantized_yet_is_listed():
    inputs = keras.Input((4, 8))
    attention = L.MultiHeadAttention(2, 4, name="masked")
    model = keras.Model(inputs, attention(inputs, inputs, use_causal_mask=True))
    with pytest.raises(
        ValueError, match=r"'masked' \(MultiHeadAttention: called with use_causal_mask"
    ):
        kq.convert_quant_network(model)
    images = keras.Input((3, 3, 8))
    axes = keras.Model(
        images, L.MultiHeadAttention(2, 4, attention_axes=(1, 2), name="axes")(images, images)
    )
    with pytest.raises(ValueError, match=r"'axes' \(MultiHeadAttention: attention_axes"):
        kq.convert_quant_network(axes)
