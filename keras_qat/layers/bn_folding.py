"""BatchNorm folded into fake-quantized weights: the folded layers' call.

An integer model has no BatchNorm: it is folded into the weights and bias,
`W_fold = W * gamma / sigma`, `b_fold = beta + gamma * (b - mu) / sigma`
(`sigma = sqrt(moving_variance + epsilon)`, per output channel). A folded
layer fake-quantizes exactly `W_fold` computed from the *moving* statistics,
so the quantized weights are the deployed ones and do not jitter with batch
statistics (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018, section
2.4, "batch norm folding with correction"):

- training, before `freeze_bn` steps: the output is corrected to batch
  statistics, `y * sigma / sigma_B + beta - gamma * (mu_B - b) / sigma_B`
  with `y = conv(x, fake_quant(W_fold))`, where `mu_B`, `sigma_B` are the
  statistics of the float `conv(x, W) + b`; the moving statistics update
  with the BatchNorm's momentum;
- from `freeze_bn` steps on, and in inference: `y + b_fold`, with `b_fold`
  on the int32 grid of the integer kernel (`quantizers.bias_on_grid`), and the
  moving statistics no longer change.

With `synchronized=True` the batch statistics are those of the global batch
under a `tf.distribute` strategy (Keras' `BatchNormalization(synchronized=
True)` semantics); otherwise each replica uses its own shard.

Training computes the batch statistics (one extra float conv or matmul) in
every step, also after `freeze_bn`, and selects the result: a conditional
would stop `tf.distribute` from updating the statistics.

Only multiplications by `sigma / sigma_B` and `gamma / sigma` appear, never a
division by `gamma`, so a channel with `gamma = 0` stays finite (PyTorch hit
that division in its folded layers).
"""

import keras
import tensorflow as tf

from keras_qat.quantizers import bias_on_grid


def fold_factor(bn):
    """Returns `(gamma / sigma, sigma)` of the moving statistics, float32."""
    sigma = tf.sqrt(tf.cast(bn.moving_variance, tf.float32) + bn.epsilon)
    return tf.cast(bn.gamma, tf.float32) / sigma, sigma


def folded_kernel(layer):
    """`W * gamma / sigma` (moving statistics), per output channel."""
    factor, _ = fold_factor(layer.bn)
    return tf.cast(layer.kernel(), tf.float32) * factor


def folded_bias(layer):
    """`beta + gamma * (b - moving_mean) / sigma`, float32."""
    bn = layer.bn
    factor, _ = fold_factor(bn)
    return tf.cast(bn.beta, tf.float32) + factor * (
        _bias(layer) - tf.cast(bn.moving_mean, tf.float32)
    )


def _bias(layer):
    linear = layer.linear_layer
    if linear.use_bias:
        return tf.cast(linear.bias, tf.float32)
    return tf.zeros_like(tf.cast(layer.bn.beta, tf.float32))


def folded_call(layer, inputs, training, input_grid):
    """A folded layer's output before its activation (see module docstring)."""
    step = tf.identity(layer.weight_quantizer.step)  # before this call's count
    weights = layer.weight_quantizer.quantize_weights(folded_kernel(layer), training)
    outputs = tf.cast(layer.kernel_op(inputs, tf.cast(weights.values, inputs.dtype)), tf.float32)
    frozen = outputs + bias_on_grid(folded_bias(layer), input_grid, weights.scale)
    if training:
        # Both are computed and one selected: no control flow, which
        # tf.distribute cannot cross with the statistics' updates.
        before_freeze = step < layer.freeze_bn
        corrected = _batch_corrected(layer, inputs, outputs, before_freeze)
        frozen = tf.where(before_freeze, corrected, frozen)
    return tf.cast(frozen, inputs.dtype)


def _batch_corrected(layer, inputs, outputs, update):
    """Output rescaled to batch statistics; moving statistics updated where
    `update` (before `freeze_bn`), kept otherwise."""
    bn = layer.bn
    bias = _bias(layer)
    raw = tf.cast(layer.kernel_op(inputs, tf.cast(layer.kernel(), inputs.dtype)), tf.float32) + bias
    axes = list(range(raw.shape.rank - 1))
    mean, variance = keras.ops.moments(raw, axes, synchronized=bn.synchronized)
    _, sigma = fold_factor(bn)
    sigma_batch = tf.sqrt(variance + bn.epsilon)
    corrected = outputs * (sigma / sigma_batch) + (
        tf.cast(bn.beta, tf.float32) - tf.cast(bn.gamma, tf.float32) * (mean - bias) / sigma_batch
    )
    momentum = bn.momentum
    for statistic, batch_value in (
        (bn.moving_mean, mean),
        (bn.moving_variance, variance),
    ):
        moved = statistic * momentum + tf.stop_gradient(batch_value) * (1.0 - momentum)
        statistic.assign(tf.where(update, moved, statistic))
    return corrected
