import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

import keras_qat as kq
from keras_qat import Conv2DBnAct, DenseBnAct, QuantConv2DBnFoldAct, QuantDenseBnFoldAct
from keras_qat.export.interpreter import float_ops
from keras_qat.layers import bn_folding

EPS = 1e-3
EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])


def randomize(layer, rng, channels, zero_gamma=False, tiny_variance=False):
    bn = layer.bn
    gamma = rng.uniform(0.5, 1.5, channels)
    variance = rng.uniform(0.3, 2.0, channels)
    if zero_gamma:
        gamma[0] = 0.0
    if tiny_variance:
        variance[1] = 0.0
    bn.gamma.assign(gamma)
    bn.beta.assign(rng.uniform(-0.5, 0.5, channels))
    bn.moving_mean.assign(rng.uniform(-0.3, 0.3, channels))
    bn.moving_variance.assign(variance)
    if layer.linear_layer.use_bias:
        layer.linear_layer.bias.assign(rng.uniform(-0.2, 0.2, channels))


def numpy_folded(layer):
    """W_fold, b_fold from the layer's own variables, in numpy."""
    bn = layer.bn
    sigma = np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    scale = bn.gamma.numpy() / sigma
    kernel = layer.linear_layer.kernel.numpy()
    bias = layer.linear_layer.bias.numpy() if layer.linear_layer.use_bias else 0.0
    return kernel * scale, bn.beta.numpy() + scale * (bias - bn.moving_mean.numpy())


def numpy_fake_quant_kernel(kernel, per_channel, num_bits=8, symmetric=False, narrow_range=False):
    if not per_channel:
        return reference.fake_quant(
            kernel, kernel.min(), kernel.max(), num_bits, narrow_range, symmetric
        )
    out = np.empty_like(kernel)
    for c in range(kernel.shape[-1]):
        k = kernel[..., c]
        out[..., c] = reference.fake_quant(k, k.min(), k.max(), num_bits, narrow_range, symmetric)
    return out


def conv(x, kernel):
    return tf.nn.conv2d(x, kernel, 1, "VALID").numpy()


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_inference_is_the_deployed_arithmetic(per_channel, use_bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 7, 3)).astype("float32")
    layer = QuantConv2DBnFoldAct(
        5,
        3,
        has_bn=True,
        use_bias=use_bias,
        activation="relu6",
        weight_quantizer=dict(per_channel=per_channel, symmetric=True, narrow_range=True),
    )
    layer.build(x.shape)
    randomize(layer, rng, 5)
    w_fold, b_fold = numpy_folded(layer)
    q = numpy_fake_quant_kernel(w_fold, per_channel, symmetric=True, narrow_range=True)
    expected = np.clip(conv(x, q) + b_fold, 0, 6)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn_folding.folded_kernel(layer), w_fold, rtol=1e-6)


def test_dense_inference_is_the_deployed_arithmetic():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6)).astype("float32")
    layer = QuantDenseBnFoldAct(3, has_bn=True, weight_quantizer=dict(per_channel=True, num_bits=4))
    layer.build(x.shape)
    randomize(layer, rng, 3)
    w_fold, b_fold = numpy_folded(layer)
    expected = x @ numpy_fake_quant_kernel(w_fold, True, num_bits=4) + b_fold
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls, float_cls, args, shape",
    [
        (QuantConv2DBnFoldAct, Conv2DBnAct, (4, 3), (2, 8, 8, 3)),
        (QuantDenseBnFoldAct, DenseBnAct, (4,), (5, 6)),
    ],
)
def test_delayed_inference_equals_the_float_layer(cls, float_cls, args, shape):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype("float32")
    float_layer = float_cls(*args, has_bn=True, activation="relu")
    float_layer.build(x.shape)
    randomize(float_layer, rng, 4)
    layer = cls(*args, has_bn=True, activation="relu", weight_quantizer=dict(quant_delay=10))
    layer.build(x.shape)
    layer.copy_weights_from(float_layer)
    np.testing.assert_allclose(layer(x), float_layer(x), rtol=1e-5, atol=1e-5)


def numpy_training_step(layer_state, x, per_channel, momentum, frozen):
    """One training call of a folded conv, from the formulas, in numpy."""
    kernel, bias, gamma, beta, mean_r, var_r = layer_state
    sigma_r = np.sqrt(var_r + EPS)
    w_fold = kernel * gamma / sigma_r
    y = conv(x, numpy_fake_quant_kernel(w_fold, per_channel))
    if frozen:
        return y + beta - gamma * (mean_r - bias) / sigma_r, mean_r, var_r
    # The quantized convolution with the fold factor divided back out, then
    # batch-normalized with its own statistics (one convolution a step).
    inverse = np.divide(sigma_r, gamma, out=np.zeros_like(gamma), where=gamma != 0)
    unfolded = y * inverse + bias
    mean_b, var_b = unfolded.mean(axis=(0, 1, 2)), unfolded.var(axis=(0, 1, 2))
    out = gamma * (unfolded - mean_b) / np.sqrt(var_b + EPS) + beta
    return (
        out,
        momentum * mean_r + (1 - momentum) * mean_b,
        momentum * var_r + (1 - momentum) * var_b,
    )


@pytest.mark.parametrize("per_channel", [True, False])
def test_training_output_and_statistics_before_and_after_freeze(per_channel):
    rng = np.random.default_rng(3)
    layer = QuantConv2DBnFoldAct(
        4, 3, has_bn=True, weight_quantizer=dict(per_channel=per_channel), momentum=0.9, freeze_bn=2
    )
    layer.build((None, 6, 6, 2))
    randomize(layer, rng, 4)
    for step in range(4):
        x = (rng.standard_normal((3, 6, 6, 2)) * (step + 1)).astype("float32")
        state = (
            layer.conv.kernel.numpy(),
            layer.conv.bias.numpy(),
            layer.bn.gamma.numpy(),
            layer.bn.beta.numpy(),
            layer.bn.moving_mean.numpy(),
            layer.bn.moving_variance.numpy(),
        )
        expected, mean, var = numpy_training_step(state, x, per_channel, 0.9, frozen=step >= 2)
        np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(layer.bn.moving_mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.bn.moving_variance, var, rtol=1e-5, atol=1e-6)
        assert layer.weight_quantizer.step.numpy() == step + 1


def test_gamma_zero_and_zero_variance_stay_finite():
    rng = np.random.default_rng(4)
    layer = QuantConv2DBnFoldAct(
        4, 3, has_bn=True, weight_quantizer=dict(per_channel=True), freeze_bn=1
    )
    layer.build((None, 6, 6, 2))
    randomize(layer, rng, 4, zero_gamma=True, tiny_variance=True)
    x = rng.standard_normal((3, 6, 6, 2)).astype("float32")
    for _ in range(2):  # batch-corrected, then frozen
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        grads = tape.gradient(loss, layer.trainable_weights)
        assert np.all(np.isfinite(y))
        for weight, grad in zip(layer.trainable_weights, grads):
            assert grad is not None and np.all(np.isfinite(grad)), weight.path
    assert np.all(np.isfinite(layer(x)))


def test_gradients_reach_kernel_gamma_and_beta():
    rng = np.random.default_rng(5)
    layer = QuantDenseBnFoldAct(3, has_bn=True)
    x = rng.standard_normal((8, 4)).astype("float32")
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, training=True) ** 2)
    grads = dict(
        zip(
            [w.path.split("/", 1)[1] for w in layer.trainable_weights],
            tape.gradient(loss, layer.trainable_weights),
        )
    )
    for name in ("dense/kernel", "bn/gamma", "bn/beta"):
        assert np.any(grads[name].numpy() != 0), name


def test_needs_batchnorm_and_config_round_trip():
    with pytest.raises(ValueError, match="has_bn=True"):
        QuantConv2DBnFoldAct(4, 3)
    with pytest.raises(ValueError, match="freeze_bn"):
        QuantDenseBnFoldAct(4, has_bn=True, freeze_bn=-1)
    layer = QuantConv2DBnFoldAct(4, 3, has_bn=True, freeze_bn=7, weight_quantizer=dict(num_bits=6))
    assert QuantConv2DBnFoldAct.from_config(layer.get_config()).get_config() == layer.get_config()


def folded_model():
    inputs = keras.Input((10, 10, 3))
    x = Conv2DBnAct(6, 3, has_bn=True, activation="relu")(inputs)
    x = Conv2DBnAct(6, 3, has_bn=True, use_bias=False)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = DenseBnAct(4, has_bn=True)(x)
    return keras.Model(inputs, outputs)


def test_convert_folds_by_default_and_freezing_survives_save_load(tmp_path):
    model = folded_model()
    qat_model = kq.convert_quant_network(model, freeze_bn=2)
    kinds = [type(layer).__name__ for layer in qat_model.layers]
    assert kinds.count("QuantConv2DBnFoldAct") == 2 and "QuantDenseBnFoldAct" in kinds
    unfolded = kq.convert_quant_network(model, bn_fold=False)
    assert "QuantConv2DBnFoldAct" not in [type(layer).__name__ for layer in unfolded.layers]
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 10, 10, 3)).astype("float32")
    y = rng.standard_normal((8, 4)).astype("float32")
    qat_model.compile(optimizer="sgd", loss="mse")
    for _ in range(2):
        qat_model.train_on_batch(x, y)
    path = str(tmp_path / "folded.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    conv = [layer for layer in loaded.layers if isinstance(layer, QuantConv2DBnFoldAct)][0]
    assert conv.weight_quantizer.step.numpy() == 2 and conv.freeze_bn == 2
    before = conv.bn.moving_mean.numpy().copy()
    loaded.train_on_batch(x * 3, y)  # step 2 >= freeze_bn: statistics frozen
    np.testing.assert_array_equal(conv.bn.moving_mean, before)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), loaded(x, training=False), rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_folded_model_exports_to_int8(per_channel):
    model = folded_model()
    qat_model = kq.convert_quant_network(
        model,
        per_channel=[per_channel, False],
        symmetric=[True, False],
        narrow_range=[True, False],
        freeze_bn=3,
    )
    rng = np.random.default_rng(7)
    x = rng.standard_normal((128, 10, 10, 3)).astype("float32")
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    for _ in range(5):
        qat_model.train_on_batch(x, rng.standard_normal((128, 4)).astype("float32"))
    tflite_bytes = kq.export_tflite(qat_model)  # per-tensor weights too: the BN is already folded
    assert float_ops(tflite_bytes) == []
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["within_one_step"] >= 0.99 and report["top1_agreement_unambiguous"] >= 0.999, (
        report
    )


def fit_and_compare(qat_model, x, outputs):
    """Two training steps, then the int8 model's report on `x`."""
    qat_model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    for _ in range(2):
        qat_model.train_on_batch(x, np.zeros((len(x), outputs)))
    return kq.compare_tflite(qat_model, kq.export_tflite(qat_model), x)


def test_batchnorm_without_center_or_scale_folds_and_exports():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.BatchNormalization(center=False, scale=False)(x)
    x = keras.layers.Flatten()(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    qat_model = kq.convert_quant_network(model, **EXPORTABLE)
    assert isinstance(qat_model.layers[2], QuantConv2DBnFoldAct)
    data = np.random.default_rng(8).uniform(-1, 1, (32, 8, 8, 3)).astype("float32")
    report = fit_and_compare(qat_model, data, 2)
    assert report["within_one_step"] == 1.0, report


def test_a_grouped_convolution_folds_and_exports_exactly():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, groups=2, name="grouped")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    qat_model = kq.convert_quant_network(model, **EXPORTABLE)
    layer = qat_model.get_layer("grouped")
    assert isinstance(layer, QuantConv2DBnFoldAct) and layer.conv.groups == 2
    data = np.random.default_rng(9).uniform(-1, 1, (32, 8, 8, 4)).astype("float32")
    report = fit_and_compare(qat_model, data, 3)
    assert report["within_one_step"] == 1.0, report
