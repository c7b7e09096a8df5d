"""Every exported layer follows Keras' conventions: its config round-trips,
it saves and loads in a `.keras` model, it runs on symbolic inputs and under
XLA; fusion layers take the arguments of the Keras layer they stand for."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qat as kq
from keras_qat import quantizer_roles

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
VECTORS = RNG.uniform(-1, 1, (4, 5)).astype("float32")
SEQUENCES = RNG.uniform(-1, 1, (4, 9, 3)).astype("float32")
SCORES = RNG.uniform(-3, 3, (4, 2, 5, 5)).astype("float32")  # (batch, heads, queries, keys)
TOKENS = RNG.integers(0, 10, (4, 6)).astype("float32")  # token ids, as Keras' Input gives them

# name -> (make the layer, a batch it takes)
LAYERS = {
    "FakeQuant": (lambda: kq.FakeQuant(num_bits=6), VECTORS),
    "LearnedFakeQuant": (lambda: kq.LearnedFakeQuant(num_bits=6, activation="relu"), VECTORS),
    "Conv2DBnAct": (lambda: kq.Conv2DBnAct(4, 3, has_bn=True, activation="relu"), IMAGES),
    "DenseBnAct": (lambda: kq.DenseBnAct(3, has_bn=True, activation="relu6"), VECTORS),
    "DepthwiseConv2DBnAct": (
        lambda: kq.DepthwiseConv2DBnAct(3, depth_multiplier=2, has_bn=True),
        IMAGES,
    ),
    "QuantConv2DBnAct": (
        lambda: kq.QuantConv2DBnAct(4, 3, weight_quantizer=dict(num_bits=4)),
        IMAGES,
    ),
    "QuantDenseBnAct": (
        lambda: kq.QuantDenseBnAct(3, has_bn=True, weight_quantizer=dict(per_channel=True)),
        VECTORS,
    ),
    "QuantDepthwiseConv2DBnAct": (
        # Symmetric weights on the narrow grid: on the full grid the zero
        # point is a tie (127.5), which XLA and the CPU kernel round apart
        # (docs/known-limits.md).
        lambda: kq.QuantDepthwiseConv2DBnAct(
            3, weight_quantizer=dict(symmetric=True, narrow_range=True)
        ),
        IMAGES,
    ),
    "QuantConv2DBnFoldAct": (
        lambda: kq.QuantConv2DBnFoldAct(4, 3, has_bn=True, freeze_bn=5),
        IMAGES,
    ),
    "QuantDenseBnFoldAct": (
        lambda: kq.QuantDenseBnFoldAct(3, has_bn=True, activation="relu"),
        VECTORS,
    ),
    "QuantDepthwiseConv2DBnFoldAct": (
        lambda: kq.QuantDepthwiseConv2DBnFoldAct(3, has_bn=True),
        IMAGES,
    ),
    "QuantAveragePooling2D": (
        lambda: kq.QuantAveragePooling2D(2, quantizer=dict(ema=False)),
        IMAGES,
    ),
    "QuantAveragePooling1D": (
        lambda: kq.QuantAveragePooling1D(3, quantizer=dict(ema=False)),
        SEQUENCES,
    ),
    "Conv1DBnAct": (lambda: kq.Conv1DBnAct(4, 3, padding="causal", has_bn=True), SEQUENCES),
    "QuantConv1DBnAct": (
        lambda: kq.QuantConv1DBnAct(4, 3, strides=2, weight_quantizer=dict(per_channel=True)),
        SEQUENCES,
    ),
    "QuantConv1DBnFoldAct": (
        lambda: kq.QuantConv1DBnFoldAct(4, 3, has_bn=True, activation="relu", freeze_bn=5),
        SEQUENCES,
    ),
    "DepthwiseConv1DBnAct": (
        lambda: kq.DepthwiseConv1DBnAct(3, depth_multiplier=2, has_bn=True),
        SEQUENCES,
    ),
    "QuantDepthwiseConv1DBnAct": (
        lambda: kq.QuantDepthwiseConv1DBnAct(
            3, dilation_rate=2, weight_quantizer=dict(symmetric=True, narrow_range=True)
        ),
        SEQUENCES,
    ),
    "QuantDepthwiseConv1DBnFoldAct": (
        lambda: kq.QuantDepthwiseConv1DBnFoldAct(3, padding="same", has_bn=True, freeze_bn=5),
        SEQUENCES,
    ),
    "Conv2DTransposeBnAct": (
        lambda: kq.Conv2DTransposeBnAct(4, 3, strides=2, padding="same", has_bn=True),
        IMAGES,
    ),
    "QuantConv2DTransposeBnAct": (
        lambda: kq.QuantConv2DTransposeBnAct(
            4, 2, strides=2, weight_quantizer=dict(symmetric=True, narrow_range=True)
        ),
        IMAGES,
    ),
    "QuantConv2DTransposeBnFoldAct": (
        lambda: kq.QuantConv2DTransposeBnFoldAct(4, 3, has_bn=True, activation="relu"),
        IMAGES,
    ),
    "QuantEmbedding": (lambda: kq.QuantEmbedding(10, 4), TOKENS),
    "QuantLayerNormalization": (
        lambda: kq.QuantLayerNormalization(quantizer=dict(num_bits=7)),
        SEQUENCES,
    ),
    "AttentionScoreMask": (lambda: kq.AttentionScoreMask(causal=True), SCORES),
    "AttentionWeightMask": (lambda: kq.AttentionWeightMask(causal=True), SCORES),
    "QuantAttentionScoreMask": (
        lambda: kq.QuantAttentionScoreMask(causal=True, quantizer=dict(num_bits=6)),
        SCORES,
    ),
    "QuantUpSampling2D": (lambda: kq.QuantUpSampling2D(2, interpolation="bilinear"), IMAGES),
    "QuantResizing": (lambda: kq.QuantResizing(5, 7, interpolation="bilinear"), IMAGES),
    "QuantHardSigmoid": (lambda: kq.QuantHardSigmoid(), VECTORS),
    "QuantSwish": (lambda: kq.QuantSwish(quantizer=dict(quant_delay=1)), VECTORS),
    "WeightOperand": (lambda: kq.WeightOperand((1, 3), initializer="ones"), VECTORS),
}


def test_every_exported_layer_is_covered():
    exported = {
        name
        for name in kq.__all__
        if isinstance(getattr(kq, name), type) and issubclass(getattr(kq, name), keras.layers.Layer)
    }
    tested_below = {
        "QuantConcatenate",
        "BatchBroadcast",
        "WeightQuantizer",
        "LearnedWeightQuantizer",
    }
    assert exported - set(LAYERS) == tested_below


def model_of(name, round_after=False):
    """A model of the layer, trained one step; with `round_after`, a
    `FakeQuant` after the layer, as a converted network has."""
    make, x = LAYERS[name]
    inputs = keras.Input(x.shape[1:])
    outputs = make()(inputs)
    if round_after:
        outputs = kq.FakeQuant(name="rounded_after")(outputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.train_on_batch(x, np.zeros(model.outputs[0].shape[1:], "float32")[None].repeat(len(x), 0))
    return model, x


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_config_round_trip(name):
    layer = LAYERS[name][0]()
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_keras_file_round_trip_after_training(name, tmp_path):
    model, x = model_of(name)
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for saved, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_symbolic_call_matches_the_computed_shape(name):
    make, x = LAYERS[name]
    layer = make()
    symbolic = layer(keras.Input(x.shape[1:]))
    eager = layer(x)
    assert tuple(symbolic.shape[1:]) == tuple(eager.shape[1:])


# Float32 rounding: XLA sums and fuses in another order. Measured on these
# layers: at most 2.4e-7 apart (2 ulps of the largest outputs), 1.2e-6 of
# the median output (Conv2DTransposeBnAct). This is 1e-5, about 80 float32
# epsilons, of an output plus the median output.
FLOAT_RTOL = 1e-5


def output_grid_step(model):
    """The step of the grid the model's output is rounded to: that of its
    last layer's "output" quantizer (`quantizers()`), or None."""
    quantizer = quantizer_roles.quantizers_of(model.layers[-1]).get("output")
    return None if quantizer is None else quantizer.grid_scale(quantizer.min, quantizer.max).numpy()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_xla_matches_graph_within_float_rounding_or_one_output_step(name):
    """A layer without quantizers computes under XLA what it computes
    without, to float rounding. A quantizing layer's output is rounded: by
    its own output quantizer, or else by the `FakeQuant` after it in a
    network (put there). XLA may round a near-tie the other way, so an
    output may be one step of that grid off. A near-tie is a value within
    float rounding of a rounding boundary; the float differences measured
    here are at most 2.4e-5 of a step, so about 5e-5 of the outputs are
    near-ties. None is a step off here (measured); at most 1 % may be."""
    roles = quantizer_roles.quantizers_of(LAYERS[name][0]())
    model, x = model_of(name, round_after=bool(roles) and "output" not in roles)
    graph_out = model.predict(x, verbose=0)
    xla_out = tf.function(lambda t: model(t, training=False), jit_compile=True)(x).numpy()
    median = np.median(np.abs(graph_out[graph_out != 0]))
    float_rounding = FLOAT_RTOL * (np.abs(graph_out) + median)
    difference = np.abs(xla_out - graph_out)
    step = output_grid_step(model)
    if step is None:
        assert np.all(difference <= float_rounding), difference.max()
        return
    assert np.all(difference <= step + float_rounding), (difference.max(), step)
    assert np.mean(difference > float_rounding) <= 0.01, np.mean(difference > float_rounding)


def test_quant_concatenate_contract(tmp_path):
    a, b = keras.Input((5,)), keras.Input((5,))
    layer = kq.QuantConcatenate(quantize_inputs=[True, False], quantizer=dict(num_bits=6))
    model = keras.Model([a, b], layer([a, b]))
    assert kq.QuantConcatenate.from_config(layer.get_config()).get_config() == layer.get_config()
    model.compile(optimizer="sgd", loss="mse")
    model.train_on_batch([VECTORS, -VECTORS], np.zeros((4, 10), "float32"))
    path = str(tmp_path / "concat.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.predict([VECTORS, VECTORS], verbose=0), model.predict([VECTORS, VECTORS], verbose=0)
    )


def test_batch_broadcast_contract(tmp_path):
    row, reference = keras.Input((1, 4)), keras.Input((5, 4))
    layer = kq.BatchBroadcast()
    model = keras.Model([row, reference], layer([row, reference]))
    assert kq.BatchBroadcast.from_config(layer.get_config()).get_config() == layer.get_config()
    rows = np.arange(4, dtype="float32").reshape(1, 1, 4)
    references = np.zeros((3, 5, 4), "float32")
    expected = np.repeat(rows, 3, axis=0)
    np.testing.assert_array_equal(model([rows, references]).numpy(), expected)
    xla = tf.function(lambda a, b: model([a, b]), jit_compile=True)
    np.testing.assert_array_equal(xla(rows, references).numpy(), expected)
    path = str(tmp_path / "broadcast.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded([rows, references]).numpy(), expected)


@pytest.mark.parametrize("cls", [kq.WeightQuantizer, kq.LearnedWeightQuantizer])
def test_weight_quantizer_contract(cls):
    quantizer = cls(num_bits=4, per_channel=True, symmetric=True, narrow_range=True, quant_delay=2)
    config = quantizer.get_config()
    assert cls.from_config(config).get_config() == config
    assert kq.WeightQuantizer.get(dict(num_bits=4)).num_bits == 4
    with pytest.raises(ValueError, match="weight_quantizer"):
        kq.QuantDenseBnAct(3, weight_quantizer="int4")


def signature(cls):
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "kwargs")
    }


# Arguments of the Keras layers that fusion layers do not take: LoRA and
# Keras' own post-training quantization (conversion refuses them).
NOT_TAKEN = {"lora_rank", "lora_alpha", "quantization_config"}


@pytest.mark.parametrize(
    "fusion, keras_layer",
    [
        (kq.Conv2DBnAct, keras.layers.Conv2D),
        (kq.DenseBnAct, keras.layers.Dense),
        (kq.DepthwiseConv2DBnAct, keras.layers.DepthwiseConv2D),
        (kq.Conv1DBnAct, keras.layers.Conv1D),
        (kq.DepthwiseConv1DBnAct, keras.layers.DepthwiseConv1D),
        (kq.Conv2DTransposeBnAct, keras.layers.Conv2DTranspose),
    ],
)
def test_fusion_layers_take_the_arguments_and_defaults_of_their_keras_layer(fusion, keras_layer):
    ours, theirs = signature(fusion), signature(keras_layer)
    for name, default in theirs.items():
        if name in NOT_TAKEN:
            continue
        assert name in ours, name
        assert ours[name] == default, name
    bn = signature(keras.layers.BatchNormalization)
    base = signature(kq.layers.fusion.FusionLayer)
    for name in (
        "momentum",
        "epsilon",
        "center",
        "scale",
        "beta_initializer",
        "gamma_initializer",
        "moving_mean_initializer",
        "moving_variance_initializer",
        "beta_regularizer",
        "gamma_regularizer",
        "beta_constraint",
        "gamma_constraint",
        "synchronized",
    ):
        assert base[name] == bn[name], name
