"""MultiHeadAttention: traced into its projections (Dense layers) and the
Keras operations of its attention, with its weights, then quantized and
exported to int8."""

import inspect

import keras
import numpy as np
import pytest
import reference
from test_export import assert_integer_model, calibrate

import keras_qat as kq
from keras_qat.transforms.support import DECOMPOSITIONS, needs_tracing
from keras_qat.transforms.tracing import trace_layers

L = keras.layers
ops = keras.ops
KERAS_VERSION = tuple(int(part) for part in keras.version().split(".")[:2])


def decompose_attention(model):
    """`model` as conversion rewrites it before quantizing: attention layers
    traced, their EinsumDense projections as Dense layers."""
    model = trace_layers(model, needs_tracing)
    for decomposition in DECOMPOSITIONS:
        model = decomposition.rewrite(model)
    return model


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
    qat_model = calibrate(kq.convert_quant_network(model), x, steps=3)
    path = str(tmp_path / "block.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))
    tflite_bytes = kq.export_tflite(loaded)
    assert_integer_model(
        tflite_bytes, ["FULLY_CONNECTED", "BATCH_MATMUL", "SOFTMAX", "GELU", "RSQRT", "MEAN"]
    )
    report = kq.compare_tflite(loaded, tflite_bytes, x)
    assert report["max_diff_steps"] <= 3.001 and report["within_one_step"] >= 0.95, report


def masked_attention(mask="bool", causal=False, sequence=8, width=16):
    """Self-attention with an `attention_mask` input (bool or int 0 / 1,
    or none) and / or a causal mask, returning its scores too."""
    inputs = keras.Input((sequence, width))
    model_inputs, options = [inputs], dict(use_causal_mask=causal, return_attention_scores=True)
    if mask is not None:
        mask_input = keras.Input((sequence, sequence), dtype=mask, name="mask")
        model_inputs.append(mask_input)
        options["attention_mask"] = mask_input
    attended, scores = L.MultiHeadAttention(2, width // 2, name="attention")(
        inputs, inputs, **options
    )
    outputs = L.Dense(3)(L.GlobalAveragePooling1D()(attended))
    return keras.Model(model_inputs, [outputs, scores])


def masked_batch(model, n, seed=0):
    """Inputs, and a random mask that keeps each query's first key (a row
    with no key kept gets uniform weights, in Keras as in int8)."""
    rng = np.random.default_rng(seed)
    sequence, width = model.inputs[0].shape[1:]
    x = [rng.normal(0, 1, (n, sequence, width)).astype("float32")]
    if len(model.inputs) == 2:
        keep = rng.uniform(size=(n, sequence, sequence)) > 0.4
        keep[:, :, 0] = True
        x.append(keep.astype(model.inputs[1].dtype))
    return x


@pytest.mark.parametrize(
    "mask, causal", [("bool", False), ("int32", False), (None, True), ("bool", True)]
)
def test_masked_decomposition_computes_what_the_layer_computes(mask, causal):
    model = masked_attention(mask, causal)
    x = masked_batch(model, 8)
    decomposed = decompose_attention(model)
    assert "AttentionScoreMask" in [type(layer).__name__ for layer in decomposed.layers]
    for ours, theirs in zip(decomposed.predict(x, verbose=0), model.predict(x, verbose=0)):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    scores = model.predict(x, verbose=0)[1]
    keep = np.ones(scores.shape, bool)
    if mask is not None:
        keep &= x[1].astype(bool)[:, None]
    if causal:
        keep &= np.tri(scores.shape[-1], dtype=bool)
    assert np.all(scores[~keep] == 0)  # the reference: no weight where excluded


def test_quantized_mask_puts_excluded_scores_at_the_bottom_of_their_grid():
    rng = np.random.default_rng(3)
    scores = rng.uniform(-3, 5, (4, 2, 6, 6)).astype("float32")
    scores[:, :, 2] = -3.0  # rows whose kept scores are all at the bottom of the range
    keep = rng.uniform(size=(4, 6, 6)) > 0.5
    keep[:, :, 0] = True
    layer = kq.QuantAttentionScoreMask(causal=True, quantizer=dict(ema=False))
    trained = layer([scores, keep], training=True).numpy()
    low, high = float(layer.quantizer.min.numpy()), float(layer.quantizer.max.numpy())
    assert (low, high) == (float(scores.min()), float(scores.max()))  # of all scores
    # The reference: the grid reaches 7 below the learned range; kept scores
    # at least the range's minimum on it, excluded ones at its bottom.
    expected = reference.fake_quant(scores, low - 7, high)
    floor = reference.fake_quant(np.float32(low), low - 7, high)
    expected = np.maximum(expected, floor)
    bottom = reference.nudge(low - 7, high, 8, False, False)[0]
    excluded = np.broadcast_to(~(keep[:, None] & np.tri(6, dtype=bool)), scores.shape)
    expected[excluded] = bottom
    np.testing.assert_allclose(trained, expected, atol=1e-6)
    np.testing.assert_allclose(layer([scores, keep]).numpy(), expected, atol=1e-6)
    # No weight for an excluded key once int8 softmax rounds (step 1/256).
    weights = keras.ops.softmax(trained, axis=-1).numpy()
    assert weights[excluded].max() < 1 / 512, weights[excluded].max()
    # During a quant delay: the float mask (Keras' large negative number).
    delayed = kq.QuantAttentionScoreMask(quantizer=dict(quant_delay=5))
    outputs = delayed([scores, keep], training=True).numpy()
    np.testing.assert_array_equal(outputs[~keep[:, None].repeat(2, 1)], -1e9)
    with pytest.raises(ValueError, match="Received: attention_mask.shape="):
        kq.AttentionScoreMask()([scores, keep[0]])


def test_masked_keys_get_no_weight_in_the_int8_model():
    """A causal mask's first query keeps one key: where its score is low,
    the masked keys must still get no weight (at the bottom of the learned
    range itself they got up to 12 %)."""
    model = masked_attention(None, causal=True)
    x = masked_batch(model, 256, seed=2)
    qat_model = calibrate(kq.convert_quant_network(model), x, steps=3)
    tflite_scores = kq.run_tflite(kq.export_tflite(qat_model), x)[0][1]
    keras_scores = qat_model.predict(x, verbose=0)[1]
    future = ~np.tri(8, dtype=bool)
    for scores in (keras_scores, tflite_scores):
        assert np.all(scores[..., future] == 0), scores[..., future].max()


@pytest.mark.parametrize("mask, causal", [("bool", False), ("int32", True)])
def test_masked_attention_exports_to_int8_like_the_keras_model(mask, causal, tmp_path):
    model = masked_attention(mask, causal)
    x = masked_batch(model, 256, seed=1)
    qat_model = calibrate(kq.convert_quant_network(model), x, steps=3)
    path = str(tmp_path / "masked.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    for a, b in zip(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)
    tflite_bytes = kq.export_tflite(loaded)
    assert "SELECT_V2" in assert_integer_model(tflite_bytes, ["BATCH_MATMUL", "SOFTMAX"])
    tflite_outputs, scales = kq.run_tflite(tflite_bytes, x)
    for ours, theirs, scale in zip(loaded.predict(x, verbose=0), tflite_outputs, scales):
        steps = np.abs(ours - theirs) / scale
        exact, largest = reference.ATTENTION_PARITY
        assert np.mean(steps < 0.5) >= exact and steps.max() <= largest, (
            np.mean(steps < 0.5),
            steps.max(),
        )


def keys_kept(n, length, seed=0):
    """A 0 / 1 mask per sequence position (rows keep 0 to `length`)."""
    rng = np.random.default_rng(seed)
    return (np.arange(length) < rng.integers(0, length + 1, (n, 1))).astype("int32")


def test_attention_with_keras_masks_as_arguments_computes_what_the_layer_computes():
    # query_mask / value_mask: Keras' own mask arguments, traced with the
    # layer's call (were refused before attention was traced).
    inputs, padding = keras.Input((5, 8)), keras.Input((5,), dtype="int32")
    attention = L.MultiHeadAttention(2, 4, name="masked")
    kept = ops.cast(padding, "bool")
    model = keras.Model(
        [inputs, padding], attention(inputs, inputs, query_mask=kept, value_mask=kept)
    )
    x = [np.random.default_rng(0).normal(size=(16, 5, 8)).astype("float32"), keys_kept(16, 5)]
    try:
        decomposed = decompose_attention(model)
    except ValueError as error:
        # Keras 3.10's MultiHeadAttention.call takes query_mask only as the
        # query's Keras mask, which its __call__ sets: refused, not dropped.
        assert KERAS_VERSION < (3, 15) and "leaves some of its tensor arguments unused" in str(
            error
        )
        return
    assert "MultiHeadAttention" not in [type(layer).__name__ for layer in decomposed.layers]
    np.testing.assert_allclose(
        decomposed.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


# Options of newer Keras releases' MultiHeadAttention (not in Keras 3.10).
ATTENTION_OPTIONS = [
    pytest.param(dict(use_gate=True), {}, id="gate"),
    pytest.param(dict(sliding_window=2), dict(use_causal_mask=True), id="sliding_window"),
]
ATTENTION_OPTIONS = [
    case
    for case in ATTENTION_OPTIONS
    if set(case.values[0]) <= set(inspect.signature(L.MultiHeadAttention.__init__).parameters)
]


@pytest.mark.parametrize("layer_args, call_args", ATTENTION_OPTIONS)
def test_a_gated_or_windowed_attention_computes_what_the_layer_computes_and_exports(
    layer_args, call_args
):
    # Were refused when attention was rewritten by hand; traced, the gate is
    # a projection with a sigmoid times the context, the window a constant mask.
    inputs = keras.Input((6, 8))
    attended = L.MultiHeadAttention(2, 4, name="attention", **layer_args)(
        inputs, inputs, **call_args
    )
    model = keras.Model(inputs, L.Dense(3)(attended))
    x = np.random.default_rng(0).normal(size=(64, 6, 8)).astype("float32")
    off = kq.convert_quant_network(model, quant_delay=10**6)
    np.testing.assert_allclose(off.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    qat_model = calibrate(kq.convert_quant_network(model), x, steps=2)
    tflite_bytes = kq.export_tflite(qat_model)
    assert_integer_model(tflite_bytes, ["BATCH_MATMUL", "SOFTMAX"])
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["max_diff_steps"] <= 1.001 and report["within_one_step"] == 1.0, report


def test_attention_over_two_axes_is_refused_with_the_reason():
    images = keras.Input((3, 3, 8))
    axes = keras.Model(
        images, L.MultiHeadAttention(2, 4, attention_axes=(1, 2), name="axes")(images, images)
    )
    with pytest.raises(
        ValueError, match=r"Softmax: axis=\(4, 5\): TFLite's SOFTMAX is over the last"
    ):
        kq.convert_quant_network(axes)


def test_attention_on_inputs_with_keras_masks_is_refused_with_the_reason():
    tokens = keras.Input((5,), dtype="int32")
    x = L.Embedding(10, 8, mask_zero=True)(tokens)
    model = keras.Model(tokens, L.MultiHeadAttention(2, 4, name="attention")(x, x))
    with pytest.raises(ValueError, match="'attention' .MultiHeadAttention.: called on inputs that"):
        kq.convert_quant_network(model, skip_layers=[model.layers[1].name])


def test_attention_over_one_axis_of_a_4d_input_computes_what_the_layer_computes():
    # Attention over the rows of images (issue 33: was rewritten as attention
    # over all positions, then refused); traced, it is the layer's einsums.
    images = keras.Input((4, 3, 8))
    attended = L.MultiHeadAttention(2, 4, attention_axes=(1,), name="rows")(images, images)
    model = keras.Model(images, L.Dense(2)(L.Flatten()(attended)))
    x = np.random.default_rng(0).normal(size=(16, 4, 3, 8)).astype("float32")
    off = kq.convert_quant_network(model, quant_delay=10**6)
    np.testing.assert_allclose(off.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    qat_model = calibrate(kq.convert_quant_network(model), x, steps=2)
    tflite_bytes = kq.export_tflite(qat_model)
    assert_integer_model(tflite_bytes, ["BATCH_MATMUL", "SOFTMAX"])
    assert kq.compare_tflite(qat_model, tflite_bytes, x)["max_diff_steps"] <= 1.001


def test_regularizers_reach_the_decomposed_projections():
    inputs = keras.Input((5, 8))
    attention = L.MultiHeadAttention(
        2,
        4,
        kernel_regularizer=keras.regularizers.L2(0.1),
        bias_regularizer=keras.regularizers.L1(0.2),
        activity_regularizer=keras.regularizers.L2(0.3),
        kernel_constraint=keras.constraints.NonNeg(),
    )
    model = keras.Model(inputs, attention(inputs, inputs))
    x = batch(model, 4)
    decomposed = decompose_attention(model)
    model(x)
    decomposed(x)
    np.testing.assert_allclose(
        sorted(float(v) for v in decomposed.losses),
        sorted(float(v) for v in model.losses),
        rtol=1e-5,
    )
    assert len(model.losses) == 12  # kernel, bias and output of the 4 projections
    dense = [layer for layer in decomposed.layers if isinstance(layer, L.Dense)]
    assert all(isinstance(layer.kernel_constraint, keras.constraints.NonNeg) for layer in dense)


@pytest.mark.parametrize(
    "layer_args, call_args",
    [(dict(dropout=0.1), {}), ({}, dict(return_attention_scores=True)), ({}, {})],
    ids=["dropout", "scores_returned", "dot_product_path"],
)
def test_fully_masked_queries_match_keras_on_each_attention_path(layer_args, call_args):
    inputs, mask = keras.Input((5, 8)), keras.Input((5, 5))
    attended = L.MultiHeadAttention(2, 4, **layer_args)(
        inputs, inputs, attention_mask=mask, **call_args
    )
    model = keras.Model([inputs, mask], attended)
    rng = np.random.default_rng(0)
    keep = (rng.random((4, 5, 5)) > 0.4).astype("float32")
    keep[:, 2, :] = 0  # query 2 is padding: every key excluded
    x = [rng.normal(size=(4, 5, 8)).astype("float32"), keep]
    expected = keras.tree.flatten(model.predict(x, verbose=0))
    got = keras.tree.flatten(decompose_attention(model).predict(x, verbose=0))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_masked_softmax_path_exports_its_zeroed_weights_to_int8():
    inputs, mask = keras.Input((5, 8)), keras.Input((5, 5))
    attended = L.MultiHeadAttention(2, 4, dropout=0.1)(inputs, inputs, attention_mask=mask)
    qat = kq.convert_quant_network(keras.Model([inputs, mask], attended))
    rng = np.random.default_rng(1)
    keep = (rng.random((64, 5, 5)) > 0.4).astype("float32")
    keep[:, 2, :] = 0
    x = [rng.normal(size=(64, 5, 8)).astype("float32"), keep]
    qat(x, training=True)
    tflite_bytes = kq.export_tflite(qat)
    assert_integer_model(tflite_bytes, ["SELECT_V2"])
    assert kq.compare_tflite(qat, tflite_bytes, x)["max_diff_steps"] <= 1.001


def test_a_causal_mask_over_an_unknown_length_is_refused_with_the_fix():
    inputs = keras.Input((None, 8))
    attended = L.MultiHeadAttention(2, 4, name="causal")(inputs, inputs, use_causal_mask=True)
    try:
        qat = kq.convert_quant_network(keras.Model(inputs, attended))
    except ValueError as error:
        # Keras 3.10 builds its causal mask from the length: tracing fails.
        assert KERAS_VERSION < (3, 15), error
        assert "other than the batch is None: convert a model whose inputs" in str(error)
        return
    qat(np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32"), training=True)
    with pytest.raises(
        ValueError, match=r"'causal_.*_score_mask'.*a causal mask over a sequence of"
    ):
        kq.check_exportable(qat)
