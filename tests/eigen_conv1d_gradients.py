"""Run by test_sequences_and_dense_prediction.py in a process with oneDNN off
(TensorFlow's Eigen CPU kernels): the gradients of quantized Conv1D and
DepthwiseConv1D layers against those of Keras' float layers on the
numpy-fake-quantized kernel. Prints one JSON line: the largest differences
per case."""

import json
import sys

import keras
import numpy as np
import tensorflow as tf
from test_bn_fold import numpy_fake_quant_kernel

import keras_qat as kq

NARROW = dict(symmetric=True, narrow_range=True)
CASES = {
    "conv1d_causal_dilated": (
        kq.QuantConv1DBnAct,
        keras.layers.Conv1D,
        (5, 3),
        dict(padding="causal", dilation_rate=2),
    ),
    "conv1d_dilated": (kq.QuantConv1DBnAct, keras.layers.Conv1D, (5, 3), dict(dilation_rate=3)),
    "depthwise1d_strided": (
        kq.QuantDepthwiseConv1DBnAct,
        keras.layers.DepthwiseConv1D,
        (3,),
        dict(strides=2, padding="same", depth_multiplier=2),
    ),
}


def gradients(layer, kernel, x, weights):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * weights)
    return [g.numpy() for g in tape.gradient(loss, [x, kernel])]


def differences(quant_cls, keras_cls, args, kwargs, rng):
    x = rng.uniform(-1, 1, (2, 12, 3)).astype("float32")
    layer = quant_cls(*args, weight_quantizer=dict(per_channel=True, **NARROW), **kwargs)
    layer.build(x.shape)
    linear = layer.linear_layer
    reference = keras_cls(*args, **kwargs)
    reference.build(x.shape)
    kernel = layer.kernel().numpy()  # output channels last, one range each
    flat = kernel.reshape(-1, kernel.shape[-1])
    quantized = numpy_fake_quant_kernel(flat, True, **NARROW).reshape(linear.kernel.shape)
    reference.set_weights([quantized, linear.bias.numpy()])
    weights = rng.normal(size=reference(x).shape).astype("float32")
    got = gradients(layer, linear.kernel, x, weights)
    expected = gradients(reference, reference.kernel, x, weights)
    return [float(np.max(np.abs(g - e))) for g, e in zip(got, expected)]


def main():
    keras.utils.set_random_seed(0)  # the kernels' initial values
    rng = np.random.default_rng(0)
    json.dump({name: differences(*case, rng) for name, case in CASES.items()}, sys.stdout)


if __name__ == "__main__":
    main()
