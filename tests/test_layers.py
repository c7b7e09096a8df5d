import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

from keras_qat import Conv2DBnAct, DenseBnAct, QuantConv2DBnAct, QuantDenseBnAct

ACTIVATIONS = [
    "relu",
    "relu6",
    "sigmoid",
    "leaky_relu",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    None,
]


def randomize_bn(layer, rng):
    """Gives a layer's BatchNorm non-trivial statistics."""
    bn = layer.bn
    channels = bn.gamma.shape[0]
    bn.gamma.assign(rng.uniform(0.5, 1.5, channels))
    bn.beta.assign(rng.uniform(-0.5, 0.5, channels))
    bn.moving_mean.assign(rng.uniform(-0.3, 0.3, channels))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, channels))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [False, True])
def test_conv2d_bn_act_equals_keras_layers(activation, training):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 3)).astype("float32")
    fused = Conv2DBnAct(4, 3, strides=2, padding="same", has_bn=True, activation=activation)
    fused.build(x.shape)
    randomize_bn(fused, rng)
    conv = keras.layers.Conv2D(4, 3, strides=2, padding="same")
    bn = keras.layers.BatchNormalization()
    act = keras.layers.Activation(activation or "linear")
    keras.Sequential([keras.Input(x.shape[1:]), conv, bn, act])
    conv.set_weights(fused.conv.get_weights())
    bn.set_weights(fused.bn.get_weights())
    expected = act(bn(conv(x), training=training))
    np.testing.assert_allclose(fused(x, training=training), expected, rtol=1e-5, atol=1e-6)
    if training:  # the moving statistics moved the same way
        np.testing.assert_allclose(fused.bn.moving_mean, bn.moving_mean, rtol=1e-5, atol=1e-7)


def test_dense_bn_act_equals_keras_layers():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype("float32")
    fused = DenseBnAct(3, has_bn=True, activation="relu6")
    fused.build(x.shape)
    randomize_bn(fused, rng)
    dense, bn = keras.layers.Dense(3), keras.layers.BatchNormalization()
    dense.build(x.shape)
    bn.build((None, 3))
    dense.set_weights(fused.dense.get_weights())
    bn.set_weights(fused.bn.get_weights())
    expected = keras.activations.relu6(bn(dense(x)))
    np.testing.assert_allclose(fused(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cls, args",
    [
        (Conv2DBnAct, (4, 3)),
        (DenseBnAct, (4,)),
        (QuantConv2DBnAct, (4, 3)),
        (QuantDenseBnAct, (4,)),
    ],
)
def test_config_round_trip(cls, args):
    layer = cls(*args, has_bn=True, activation="relu6", use_bias=False, momentum=0.9, name="unit")
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    assert config["activation"] == "relu6" and config["has_bn"] and not config["use_bias"]


def test_invalid_arguments_are_reported():
    with pytest.raises(ValueError, match="activation"):
        Conv2DBnAct(4, 3, activation="no_such_activation")
    with pytest.raises(ValueError, match="has_bn"):
        DenseBnAct(4, has_bn="yes")
    with pytest.raises(ValueError):
        Conv2DBnAct(0, 3)  # Keras' own check of `filters`
    with pytest.raises(ValueError, match="num_bits"):
        QuantConv2DBnAct(4, 3, weight_quantizer=dict(num_bits=20))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric, narrow_range", [(False, False), (True, True)])
def test_quant_conv_inference_is_conv_of_fake_quantized_kernel(
    per_channel, symmetric, narrow_range
):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 8, 3)).astype("float32")
    layer = QuantConv2DBnAct(
        5,
        3,
        has_bn=True,
        activation="relu",
        weight_quantizer=dict(
            num_bits=4, per_channel=per_channel, symmetric=symmetric, narrow_range=narrow_range
        ),
    )
    layer.build(x.shape)
    randomize_bn(layer, rng)
    layer.conv.bias.assign(rng.uniform(-0.2, 0.2, 5))
    kernel = layer.conv.kernel.numpy()
    q_kernel = np.empty_like(kernel)
    if per_channel:
        for c in range(5):
            k = kernel[..., c]
            q_kernel[..., c] = reference.fake_quant(k, k.min(), k.max(), 4, narrow_range, symmetric)
    else:
        q_kernel = reference.fake_quant(
            kernel, kernel.min(), kernel.max(), 4, narrow_range, symmetric
        )
    y = tf.nn.conv2d(x, q_kernel, 1, "VALID") + layer.conv.bias.numpy()
    bn = layer.bn
    y = (y - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    y = np.maximum(y * bn.gamma.numpy() + bn.beta.numpy(), 0)
    np.testing.assert_allclose(layer(x), y, rtol=1e-4, atol=1e-5)
    levels = {len(np.unique(q_kernel[..., c])) for c in range(5)}
    assert max(levels) <= 16


def test_quant_dense_weight_delay_and_gradients():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6)).astype("float32")
    layer = QuantDenseBnAct(3, weight_quantizer=dict(num_bits=2, quant_delay=1))
    float_layer = DenseBnAct(3)
    float_layer.build(x.shape)
    layer.build(x.shape)
    layer.copy_weights_from(float_layer)
    np.testing.assert_array_equal(layer(x), float_layer(x))  # delayed
    np.testing.assert_array_equal(layer(x, training=True), float_layer(x))  # step 0
    assert layer.weight_quantizer.step.numpy() == 1
    with tf.GradientTape() as tape:
        y = layer(x, training=True)  # step 1: 2-bit weights
        loss = tf.reduce_sum(y)
    grads = tape.gradient(loss, layer.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
    kernel = layer.dense.kernel.numpy()
    q = reference.fake_quant(kernel, kernel.min(), kernel.max(), 2)
    np.testing.assert_allclose(y, x @ q + layer.dense.bias.numpy(), rtol=1e-5, atol=1e-6)


def test_copy_weights_reports_a_missing_weight():
    source = Conv2DBnAct(4, 3, has_bn=True)
    source.build((None, 8, 8, 3))
    target = QuantConv2DBnAct(4, 3, has_bn=False)
    target.build((None, 8, 8, 3))
    with pytest.raises(ValueError, match="bn/gamma"):
        target.copy_weights_from(source)


def test_quant_average_pooling_rounds_like_the_int8_kernel():
    from keras_qat import QuantAveragePooling2D

    rng = np.random.default_rng(4)
    layer = QuantAveragePooling2D(2, quantizer=dict(ema=False))
    x = rng.uniform(-1.0, 2.0, (4, 6, 6, 3)).astype("float32")
    layer(x, training=True)  # learns the range of x
    y = layer(x).numpy()
    nudged_min, _, scale = reference.nudge(x.min(), x.max(), 8, False)
    levels = reference.fake_quant_levels(x, x.min(), x.max())[0]
    signed = levels.reshape(4, 3, 2, 3, 2, 3).mean(axis=(2, 4)) - 128
    rounded = np.sign(signed) * np.floor(np.abs(signed) + 0.5)  # half away from zero
    assert np.mean(signed % 1 == 0.5) > 0.05  # ties, where rounding half up would differ
    np.testing.assert_allclose(y, (rounded + 128) * scale + nudged_min, rtol=0, atol=1e-5)
    # Training rounds the same way (without a quant delay too).
    np.testing.assert_allclose(layer(x, training=True), y, rtol=0, atol=1e-6)
    config = layer.get_config()
    assert QuantAveragePooling2D.from_config(config).get_config() == config
