"""An unfolded quantized layer's training BatchNorm, computed without the
bias that it cancels, against numpy and against Keras' own layers."""

import warnings

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

from keras_qat import QuantConv2DBnAct, QuantDenseBnAct

MOMENTUM = 0.9


def quant_layer(kind, rng):
    if kind == "conv":
        x = rng.standard_normal((4, 6, 6, 3))
        layer = QuantConv2DBnAct(
            5, 3, has_bn=True, momentum=MOMENTUM, weight_quantizer=dict(num_bits=4)
        )
    else:
        x = rng.standard_normal((8, 6))
        layer = QuantDenseBnAct(
            5, has_bn=True, momentum=MOMENTUM, weight_quantizer=dict(num_bits=4)
        )
    x = x.astype("float32")
    layer.build(x.shape)
    bn = layer.bn
    bn.gamma.assign(rng.uniform(0.5, 1.5, 5))
    bn.beta.assign(rng.uniform(-0.5, 0.5, 5))
    bn.moving_mean.assign(rng.uniform(-0.3, 0.3, 5))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 5))
    layer.linear_layer.bias.assign(rng.uniform(1.0, 3.0, 5))  # large against the batch mean
    return layer, x


def numpy_linear(layer, x):
    """The linear layer with its 4-bit fake-quantized kernel, plus bias."""
    kernel = layer.linear_layer.kernel.numpy()
    q_kernel = reference.fake_quant(kernel, kernel.min(), kernel.max(), num_bits=4)
    if kernel.ndim == 2:
        y = x @ q_kernel
    else:
        y = tf.nn.conv2d(x, q_kernel, 1, "VALID").numpy()
    return y + layer.linear_layer.bias.numpy()


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_training_batchnorm_is_keras_batchnorm_of_the_biased_output(kind):
    layer, x = quant_layer(kind, np.random.default_rng(0))
    bn = layer.bn
    gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
    old_mean, old_variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    z = numpy_linear(layer, x)
    axes = tuple(range(z.ndim - 1))
    mean, variance = z.mean(axes), z.var(axes)
    expected = gamma * (z - mean) / np.sqrt(variance + bn.epsilon) + beta

    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        bn.moving_mean, MOMENTUM * old_mean + (1 - MOMENTUM) * mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        bn.moving_variance, MOMENTUM * old_variance + (1 - MOMENTUM) * variance, rtol=1e-5
    )


def test_training_graph_adds_no_bias_before_a_training_batchnorm():
    layer, x = quant_layer("conv", np.random.default_rng(1))

    def op_types(training):
        graph = tf.function(lambda v: layer(v, training=training)).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    assert "BiasAdd" not in op_types(True)
    assert "BiasAdd" in op_types(False)  # the moving statistics do not cancel it


def test_a_frozen_batchnorm_keeps_the_bias():
    layer, x = quant_layer("conv", np.random.default_rng(2))
    layer.bn.trainable = False
    bn = layer.bn
    z = numpy_linear(layer, x)
    expected = (
        bn.gamma.numpy()
        * (z - bn.moving_mean.numpy())
        / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        + bn.beta.numpy()
    )
    np.testing.assert_allclose(layer(x, training=True), expected, rtol=1e-4, atol=1e-4)


def test_the_cancelled_bias_gets_a_zero_gradient_and_no_warning():
    layer, x = quant_layer("conv", np.random.default_rng(3))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=True)))
    gradients = dict(
        zip(
            [v.path for v in layer.trainable_variables],
            tape.gradient(loss, layer.trainable_variables),
        )
    )
    bias_gradient = gradients[layer.linear_layer.bias.path]
    assert bias_gradient is not None
    np.testing.assert_array_equal(bias_gradient, np.zeros(5, "float32"))
    assert np.abs(gradients[layer.linear_layer.kernel.path]).max() > 0

    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    model.compile("sgd", "mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns of variables without gradients
        model.train_on_batch(x, np.zeros((4, 4, 4, 5), "float32"))


def test_mixed_precision_output_dtype():
    layer = QuantConv2DBnAct(4, 3, has_bn=True, dtype="mixed_float16")
    x = np.random.default_rng(4).standard_normal((2, 6, 6, 3)).astype("float32")
    outputs = layer(x, training=True)
    assert outputs.dtype == tf.float16
    assert layer.bn.moving_mean.dtype == "float32"
