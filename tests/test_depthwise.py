"""DepthwiseConv2DBnAct and its quantized forms: one weight range per
output channel (in_channels * depth_multiplier), BatchNorm folded per
output channel."""

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

import keras_qat as kq
from keras_qat import DepthwiseConv2DBnAct, QuantDepthwiseConv2DBnAct, QuantDepthwiseConv2DBnFoldAct

CHANNELS, MULTIPLIER = 3, 2
EXPORTABLE_WEIGHTS = dict(per_channel=True, symmetric=True, narrow_range=True)


def randomized(layer, rng):
    layer.build((None, 7, 7, CHANNELS))
    n = CHANNELS * MULTIPLIER
    kernel = rng.standard_normal((3, 3, CHANNELS, MULTIPLIER)).astype("float32")
    kernel *= rng.uniform(0.1, 3.0, (1, 1, CHANNELS, MULTIPLIER)).astype(
        "float32"
    )  # ranges differ per channel
    layer.depthwise.kernel.assign(kernel)
    layer.depthwise.bias.assign(rng.uniform(-0.2, 0.2, n))
    if layer.has_bn:
        bn = layer.bn
        bn.gamma.assign(rng.uniform(0.5, 1.5, n))
        bn.beta.assign(rng.uniform(-0.5, 0.5, n))
        bn.moving_mean.assign(rng.uniform(-0.3, 0.3, n))
        bn.moving_variance.assign(rng.uniform(0.3, 2.0, n))
    return layer


def per_output_channel_fake_quant(kernel, scale=None):
    """Numpy: kernel (kh, kw, C, M) times `scale` per output channel c*M+m,
    fake-quantized symmetric 8-bit with one range per output channel."""
    kh, kw, c, m = kernel.shape
    flat = kernel.reshape(kh, kw, c * m) * (1.0 if scale is None else scale)
    out = np.empty_like(flat)
    for channel in range(c * m):
        k = flat[..., channel]
        out[..., channel] = reference.fake_quant(k, k.min(), k.max(), 8, True, True)
    return out.reshape(kh, kw, c, m)


def depthwise(x, kernel):
    return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID").numpy()


def test_fusion_layer_equals_keras_layers_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 7, CHANNELS)).astype("float32")
    fused = randomized(
        DepthwiseConv2DBnAct(3, depth_multiplier=MULTIPLIER, has_bn=True, activation="relu6"), rng
    )
    plain = keras.Sequential(
        [
            keras.Input((7, 7, CHANNELS)),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=MULTIPLIER),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(6.0),
        ]
    )
    plain.layers[0].set_weights(fused.depthwise.get_weights())
    plain.layers[1].set_weights(fused.bn.get_weights())
    np.testing.assert_allclose(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    config = fused.get_config()
    assert DepthwiseConv2DBnAct.from_config(config).get_config() == config
    assert config["depth_multiplier"] == MULTIPLIER


def test_quantized_kernel_has_one_range_per_output_channel():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 7, CHANNELS)).astype("float32")
    layer = randomized(
        QuantDepthwiseConv2DBnAct(
            3, depth_multiplier=MULTIPLIER, weight_quantizer=EXPORTABLE_WEIGHTS
        ),
        rng,
    )
    kernel = layer.depthwise.kernel.numpy()
    expected = depthwise(x, per_output_channel_fake_quant(kernel)) + layer.depthwise.bias.numpy()
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    low, high = layer.weight_quantizer.range(layer.kernel())
    assert low.shape == (CHANNELS * MULTIPLIER,)
    # Symmetric weights: the range fake_quant uses, [-M, M], M = max |w|.
    np.testing.assert_allclose(high, np.abs(kernel.reshape(9, -1)).max(0))
    np.testing.assert_allclose(low, -high)


def test_folded_kernel_scales_and_quantizes_each_output_channel():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 7, 7, CHANNELS)).astype("float32")
    layer = randomized(
        QuantDepthwiseConv2DBnFoldAct(
            3, depth_multiplier=MULTIPLIER, has_bn=True, weight_quantizer=EXPORTABLE_WEIGHTS
        ),
        rng,
    )
    bn = layer.bn
    sigma = np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    scale = bn.gamma.numpy() / sigma
    bias = bn.beta.numpy() + scale * (layer.depthwise.bias.numpy() - bn.moving_mean.numpy())
    q = per_output_channel_fake_quant(layer.depthwise.kernel.numpy(), scale)
    np.testing.assert_allclose(layer(x), depthwise(x, q) + bias, rtol=1e-5, atol=1e-5)
    # Delayed, the folded layer computes the float layer.
    float_layer = randomized(DepthwiseConv2DBnAct(3, depth_multiplier=MULTIPLIER, has_bn=True), rng)
    delayed = QuantDepthwiseConv2DBnFoldAct(
        3, depth_multiplier=MULTIPLIER, has_bn=True, weight_quantizer=dict(quant_delay=5)
    )
    delayed.build(x.shape)
    delayed.copy_weights_from(float_layer)
    np.testing.assert_allclose(delayed(x), float_layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn_fold", [True, False])
def test_plain_depthwise_model_converts_trains_and_exports(bn_fold, tmp_path):
    inputs = keras.Input((10, 10, CHANNELS))
    x = keras.layers.DepthwiseConv2D(
        3, padding="same", depth_multiplier=MULTIPLIER, use_bias=False
    )(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(4, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5)(x)
    model = keras.Model(inputs, outputs)
    qat_model = kq.convert_quant_network(
        model,
        bn_fold=bn_fold,
        per_channel=[True, False],
        symmetric=[True, False],
        narrow_range=[True, False],
    )
    expected = QuantDepthwiseConv2DBnFoldAct if bn_fold else QuantDepthwiseConv2DBnAct
    assert sum(type(layer) is expected for layer in qat_model.layers) == 1
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (128, 10, 10, CHANNELS)).astype("float32")
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    qat_model.fit(
        x, rng.standard_normal((128, 5)).astype("float32"), batch_size=32, epochs=1, verbose=0
    )
    path = str(tmp_path / "depthwise.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))
    tflite_bytes = kq.export_tflite(loaded)
    interpreter = kq.tflite_interpreter(tflite_bytes, default_delegates=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    (op,) = [op for op in interpreter._get_ops_details() if op["op_name"] == "DEPTHWISE_CONV_2D"]
    weights = tensors[op["inputs"][1]]
    assert weights["dtype"] == np.int8 and list(weights["shape"]) == [
        1,
        3,
        3,
        CHANNELS * MULTIPLIER,
    ]
    assert len(weights["quantization_parameters"]["scales"]) == CHANNELS * MULTIPLIER
    assert weights["quantization_parameters"]["quantized_dimension"] == 3
    report = kq.compare_tflite(loaded, tflite_bytes, x)
    assert report["within_one_step"] >= 0.99 and report["max_diff_steps"] <= 2.001, report


def test_folded_training_step_follows_the_formulas_and_stays_finite():
    """Issue 3's batch-statistics correction, for the depthwise layer: output
    and moving statistics against numpy before and after freeze_bn, and no
    NaN with gamma = 0 and a zero variance."""
    rng = np.random.default_rng(4)
    n = CHANNELS * MULTIPLIER
    layer = randomized(
        QuantDepthwiseConv2DBnFoldAct(
            3,
            depth_multiplier=MULTIPLIER,
            has_bn=True,
            momentum=0.9,
            freeze_bn=2,
            weight_quantizer=EXPORTABLE_WEIGHTS,
        ),
        rng,
    )
    gamma = layer.bn.gamma.numpy()
    gamma[0] = 0.0
    layer.bn.gamma.assign(gamma)
    variance = layer.bn.moving_variance.numpy()
    variance[1] = 0.0
    layer.bn.moving_variance.assign(variance)
    eps = layer.bn.epsilon
    for step in range(4):
        x = (rng.standard_normal((3, 7, 7, CHANNELS)) * (step + 1)).astype("float32")
        kernel, bias = layer.depthwise.kernel.numpy(), layer.depthwise.bias.numpy()
        beta, mean_r, var_r = (
            layer.bn.beta.numpy(),
            layer.bn.moving_mean.numpy(),
            layer.bn.moving_variance.numpy(),
        )
        sigma_r = np.sqrt(var_r + eps)
        y = depthwise(x, per_output_channel_fake_quant(kernel, gamma / sigma_r))
        if step >= 2:  # frozen
            expected, mean, var = y + beta - gamma * (mean_r - bias) / sigma_r, mean_r, var_r
        else:  # the quantized convolution unfolded, normalized with its own statistics
            inverse = np.divide(sigma_r, gamma, out=np.zeros_like(gamma), where=gamma != 0)
            unfolded = y * inverse + bias
            mean_b, var_b = unfolded.mean(axis=(0, 1, 2)), unfolded.var(axis=(0, 1, 2))
            expected = gamma * (unfolded - mean_b) / np.sqrt(var_b + eps) + beta
            mean, var = 0.9 * mean_r + 0.1 * mean_b, 0.9 * var_r + 0.1 * var_b
        with tf.GradientTape() as tape:
            out = layer(x, training=True)
            loss = tf.reduce_sum(out * out)
        grads = tape.gradient(loss, layer.trainable_weights)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.bn.moving_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.bn.moving_variance, var, rtol=1e-5, atol=1e-6)
        assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
    assert layer.bn.moving_mean.shape == (n,)


@pytest.mark.parametrize("bn_fold", [True, False])
def test_dilated_depthwise_exports_to_one_int8_op(bn_fold):
    """TensorFlow computes a dilated depthwise convolution between
    SPACE_TO_BATCH_ND and BATCH_TO_SPACE_ND, which the converter left in
    float; the export trace computes it as one op."""
    inputs = keras.Input((8, 12, CHANNELS))
    x = keras.layers.DepthwiseConv2D(3, dilation_rate=2, depth_multiplier=MULTIPLIER)(inputs)
    model = keras.Model(inputs, keras.layers.ReLU()(keras.layers.BatchNormalization()(x)))
    x = np.random.default_rng(4).uniform(-1, 1, (128, 8, 12, CHANNELS)).astype("float32")
    qat_model = kq.convert_quant_network(model, bn_fold=bn_fold)
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    qat_model.fit(x, np.zeros((128, 4, 8, 6), "float32"), batch_size=64, verbose=0)
    tflite_bytes = kq.export_tflite(qat_model)
    interpreter = kq.tflite_interpreter(tflite_bytes, default_delegates=False)
    ops = [op["op_name"] for op in interpreter._get_ops_details()]
    assert ops == ["QUANTIZE", "DEPTHWISE_CONV_2D", "DEQUANTIZE"], ops
    tflite_out, scale = kq.run_tflite(tflite_bytes, x)
    steps = np.abs(qat_model.predict(x, verbose=0) - tflite_out) / scale
    assert np.mean(steps < 0.5) >= 0.999 and steps.max() <= 1.001
