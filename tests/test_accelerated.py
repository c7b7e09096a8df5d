"""XLA (jit_compile, our stand-in for TPU) and mixed precision."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qat as kq
from keras_qat.quantizers import nudged_range, quant_range

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
)
import models  # noqa: E402


def output_step(qat_model):
    layer = [layer for layer in qat_model.layers if isinstance(layer, kq.FakeQuant)][-1]
    return float(nudged_range(*quant_range(layer.min.numpy(), layer.max.numpy()))[2])


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_xla_training_and_inference_match_the_graph_within_one_step(name):
    build, shape = models.NETWORKS[name]
    qat_model = kq.convert_quant_network(build(), per_channel=[True, False])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16,) + shape).astype("float32")
    y = rng.integers(0, 10, 16)
    qat_model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        jit_compile=True,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = [float(qat_model.train_on_batch(x, y)) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    assert all(
        layer.step.numpy() == 3 for layer in qat_model.layers if isinstance(layer, kq.FakeQuant)
    )
    graph = tf.function(lambda t: qat_model(t, training=False))(x).numpy()
    xla = tf.function(lambda t: qat_model(t, training=False), jit_compile=True)(x).numpy()
    # XLA's fake-quant kernel rounds some near-ties the other way (float32
    # arithmetic in a different order): at most one output step apart; the
    # untrained ResNet-20 carries such a step through 20 layers, which grew to
    # two on an AMD EPYC (docs/known-limits.md on deep untrained networks).
    steps = 1 if name == "lenet5" else 2
    assert np.max(np.abs(graph - xla)) <= steps * output_step(qat_model) * 1.001


def small_model():
    inputs = keras.Input((8, 8, 3))
    x = kq.Conv2DBnAct(8, 3, has_bn=True, activation="relu")(inputs)
    x = kq.Conv2DBnAct(8, 3, padding="same", activation="relu6")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, kq.DenseBnAct(4)(x))


def train_ranges(policy, weights, data):
    keras.config.set_dtype_policy(policy)
    qat_model = kq.convert_quant_network(small_model(), per_channel=[True, False])
    qat_model.set_weights(weights)
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    losses = [float(qat_model.train_on_batch(x, y)) for x, y in data]
    output = qat_model(data[0][0], training=False)
    ranges = [
        (layer.min.numpy(), layer.max.numpy(), layer.min.dtype)
        for layer in qat_model.layers
        if isinstance(layer, kq.FakeQuant)
    ]
    keras.config.set_dtype_policy("float32")
    return losses, output, ranges


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 2e-2), ("mixed_bfloat16", 5e-2)])
def test_mixed_precision_trains_with_float32_ranges(policy, tolerance):
    weights = kq.convert_quant_network(small_model()).get_weights()
    rng = np.random.default_rng(1)
    data = [
        (
            rng.standard_normal((16, 8, 8, 3)).astype("float32"),
            rng.standard_normal((16, 4)).astype("float32"),
        )
        for _ in range(4)
    ]
    ref_losses, _, ref_ranges = train_ranges("float32", weights, data)
    losses, output, ranges = train_ranges(policy, weights, data)
    assert np.all(np.isfinite(losses))
    assert output.dtype == policy.split("_")[1]  # the policy's compute dtype
    for (lo, hi, dtype), (ref_lo, ref_hi, _) in zip(ranges, ref_ranges):
        assert dtype == "float32"  # fake-quant state and math stay float32
        np.testing.assert_allclose([lo, hi], [ref_lo, ref_hi], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(losses, ref_losses, rtol=10 * tolerance)


def test_xla_trains_the_real_world_layers():
    """Depthwise, separable, affine, shared-range average pooling, Keras
    operations and fixed-range softmax under jit_compile."""
    from test_fuse import image_patterns

    qat_model = kq.convert_quant_network(image_patterns(), per_channel=[True, False])
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (16, 16, 16, 3)).astype("float32")
    qat_model.compile(
        optimizer=keras.optimizers.SGD(1e-3), jit_compile=True, loss="categorical_crossentropy"
    )
    losses = [
        float(qat_model.train_on_batch(x, keras.utils.to_categorical(rng.integers(0, 5, 16), 5)))
        for _ in range(3)
    ]
    assert np.all(np.isfinite(losses))
    pooling = qat_model.get_layer("average_pooling")
    assert isinstance(pooling, kq.QuantAveragePooling2D) and pooling.quantizer.step.numpy() == 3
    logits = keras.Model(qat_model.inputs, qat_model.get_layer("logits_quant").output)
    graph = tf.function(lambda t: logits(t, training=False))(x).numpy()
    xla = tf.function(lambda t: logits(t, training=False), jit_compile=True)(x).numpy()
    assert np.max(np.abs(graph - xla)) <= output_step(logits) * 1.001


def test_a_mixed_precision_model_exports_like_its_float32_twin():
    from test_bit_widths import tflite_weight_levels

    def build():
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
        x = keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))

    options = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])
    x = np.random.default_rng(3).uniform(-1, 1, (32, 8, 8, 3)).astype("float32")
    keras.config.set_dtype_policy("mixed_float16")
    mixed = kq.convert_quant_network(build(), **options)
    mixed.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for _ in range(2):
        mixed.train_on_batch(x, np.zeros((32, 2)))
    keras.config.set_dtype_policy("float32")
    twin = kq.convert_quant_network(build(), **options)
    twin.set_weights(mixed.get_weights())
    mixed_bytes, twin_bytes = kq.export_tflite(mixed), kq.export_tflite(twin)
    for which in (0, 1):  # the conv, and the dense (a 1x1 conv with per-channel weights)
        mixed_levels, mixed_detail = tflite_weight_levels(mixed_bytes, "CONV_2D", which)
        twin_levels, twin_detail = tflite_weight_levels(twin_bytes, "CONV_2D", which)
        np.testing.assert_array_equal(mixed_levels, twin_levels)
        np.testing.assert_array_equal(
            mixed_detail["quantization_parameters"]["scales"],
            twin_detail["quantization_parameters"]["scales"],
        )
    np.testing.assert_array_equal(kq.run_tflite(mixed_bytes, x)[0], kq.run_tflite(twin_bytes, x)[0])
