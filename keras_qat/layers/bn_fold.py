"""Quantized fusion layers with BatchNorm folded into the weights.

An integer model has no BatchNorm: it is folded into the weights and bias,
`W_fold = W * gamma / sigma`, `b_fold = beta + gamma * (b - mu) / sigma`
(`sigma = sqrt(moving_variance + epsilon)`, per output channel). These
layers fake-quantize exactly `W_fold` computed from the *moving* statistics,
so the quantized weights are the deployed ones and do not jitter with batch
statistics (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018, section
2.4, "batch norm folding with correction"):

- training, before `freeze_bn` steps: the output is corrected to batch
  statistics, `y * sigma / sigma_B + beta - gamma * (mu_B - b) / sigma_B`
  with `y = conv(x, fake_quant(W_fold))`, where `mu_B`, `sigma_B` are the
  statistics of the float `conv(x, W) + b`; the moving statistics update
  with the BatchNorm's momentum;
- from `freeze_bn` steps on, and in inference: `y + b_fold`, with `b_fold`
  rounded to the int32 grid of the integer kernel (`input_scale *
  weight_scale`, see `keras_qat.layers.input_grid`), and the moving
  statistics no longer change.

With `synchronized=True` on the fusion layer, the batch statistics are those
of the global batch under a `tf.distribute` strategy (Keras'
`BatchNormalization(synchronized=True)` semantics); otherwise each replica
uses its own shard, as Keras' BatchNormalization does by default.

Training computes the batch statistics (one extra float conv or matmul) in
every step, also after `freeze_bn`, and selects the result: a conditional
would stop `tf.distribute` from updating the statistics.

Only multiplications by `sigma / sigma_B` and `gamma / sigma` appear, never a
division by `gamma`, so a channel with `gamma = 0` stays finite (PyTorch
hit that division in its folded layers).
"""

import keras
import tensorflow as tf

from keras_qat.config import check_non_negative_int
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct, DepthwiseConv2DBnAct
from keras_qat.layers.quant import (
    DenseAsConvForExport,
    DepthwiseKernelChannelsLast,
    _QuantizedWeights,
)


class _BnFolding(_QuantizedWeights):
    """Mixin: BatchNorm folded into the fake-quantized weights.

    Args:
        freeze_bn: Training step from which the batch-statistics correction
            stops and the moving statistics are frozen.
    """

    def __init__(self, *args, freeze_bn=10_000_000, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.has_bn:
            raise ValueError(
                f"{self.__class__.__name__} folds a BatchNorm and needs "
                "has_bn=True. Received: has_bn=False"
            )
        check_non_negative_int("freeze_bn", freeze_bn)
        self.freeze_bn = freeze_bn

    def folding(self):
        """Returns `(scale, sigma)`: `gamma / sigma` and `sigma`, float32."""
        bn = self.bn
        sigma = tf.sqrt(tf.cast(bn.moving_variance, tf.float32) + bn.epsilon)
        return tf.cast(bn.gamma, tf.float32) / sigma, sigma

    def folded_kernel(self):
        """`W * gamma / sigma` (moving statistics), per output channel."""
        scale, _ = self.folding()
        return tf.cast(self.weight_kernel(), tf.float32) * scale

    def folded_bias(self):
        """`beta + gamma * (b - moving_mean) / sigma`, float32."""
        scale, _ = self.folding()
        return tf.cast(self.bn.beta, tf.float32) + scale * (
            self._bias() - tf.cast(self.bn.moving_mean, tf.float32)
        )

    def _bias(self):
        layer = self.linear_layer
        if layer.use_bias:
            return tf.cast(layer.bias, tf.float32)
        return tf.zeros_like(tf.cast(self.bn.beta, tf.float32))

    def call(self, inputs, training=False):
        step = tf.identity(self.step)  # before this call's increment
        float_kernel = self.folded_kernel()
        kernel, weights_active = self.maybe_quantize_weights(float_kernel, training)
        outputs = tf.cast(
            self.apply_kernel(inputs, tf.cast(kernel, inputs.dtype)), tf.float32
        )
        frozen = outputs + self.int32_bias(
            self.folded_bias(), float_kernel, weights_active, training
        )
        if training:
            # Both are computed and one selected: no control flow, which
            # tf.distribute cannot cross with the statistics' updates.
            before_freeze = step < self.freeze_bn
            corrected = self._batch_corrected(inputs, outputs, before_freeze)
            outputs = tf.where(before_freeze, corrected, frozen)
        else:
            outputs = frozen
        return self.activation(tf.cast(outputs, inputs.dtype))

    def _batch_corrected(self, inputs, outputs, update):
        """Output rescaled to batch statistics; moving statistics updated
        where `update` (before `freeze_bn`), kept otherwise."""
        bn = self.bn
        bias = self._bias()
        raw = tf.cast(
            self.apply_kernel(inputs, tf.cast(self.weight_kernel(), inputs.dtype)),
            tf.float32,
        ) + bias
        axes = list(range(raw.shape.rank - 1))
        # Over the global batch under a strategy when the BatchNorm is
        # `synchronized`, as Keras' BatchNormalization computes them.
        mean, variance = keras.ops.moments(raw, axes, synchronized=bn.synchronized)
        _, sigma = self.folding()
        sigma_batch = tf.sqrt(variance + bn.epsilon)
        corrected = outputs * (sigma / sigma_batch) + (
            tf.cast(bn.beta, tf.float32)
            - tf.cast(bn.gamma, tf.float32) * (mean - bias) / sigma_batch
        )
        momentum = bn.momentum
        for statistic, batch_value in (
            (bn.moving_mean, mean),
            (bn.moving_variance, variance),
        ):
            moved = statistic * momentum + tf.stop_gradient(batch_value) * (
                1.0 - momentum
            )
            statistic.assign(tf.where(update, moved, statistic))
        return corrected

    def get_config(self):
        config = super().get_config()
        config["freeze_bn"] = self.freeze_bn
        return config


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantConv2DBnFoldAct(_BnFolding, Conv2DBnAct):
    """`Conv2DBnAct(has_bn=True)` with its BatchNorm folded into the weights.

    The fake-quantized kernel is `W * gamma / sqrt(moving_variance + eps)`,
    the kernel of the deployed integer model; see the module docstring for
    the training-time correction. Usually created by
    `convert_quant_network(..., bn_fold=True)`.

    Args:
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One weight range per output channel.
        symmetric: Symmetric weight range.
        narrow_range: Weight grid `[1, 2**num_bits - 1]`.
        quant_delay: Training steps before the weights are quantized.
        *args, **kwargs: The arguments of `Conv2DBnAct` (`has_bn=True`).

    Raises:
        ValueError: for `has_bn=False` or another invalid argument.

    Example:

    >>> layer = QuantConv2DBnFoldAct(8, 3, has_bn=True, per_channel=True,
    ...                              freeze_bn=1000, activation="relu")
    >>> layer(np.ones((1, 8, 8, 3), "float32")).shape
    TensorShape([1, 6, 6, 8])
    """


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDenseBnFoldAct(DenseAsConvForExport, _BnFolding, DenseBnAct):
    """`DenseBnAct(has_bn=True)` with its BatchNorm folded into the weights.

    As `QuantConv2DBnFoldAct`, for a dense layer.

    Args:
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One weight range per output unit.
        symmetric: Symmetric weight range.
        narrow_range: Weight grid `[1, 2**num_bits - 1]`.
        quant_delay: Training steps before the weights are quantized.
        *args, **kwargs: The arguments of `DenseBnAct` (`has_bn=True`).

    Raises:
        ValueError: for `has_bn=False` or another invalid argument.

    Example:

    >>> layer = QuantDenseBnFoldAct(4, has_bn=True)
    >>> layer(np.ones((2, 3), "float32")).shape
    TensorShape([2, 4])
    """


@keras.saving.register_keras_serializable(package="keras_qat")
class QuantDepthwiseConv2DBnFoldAct(
    DepthwiseKernelChannelsLast, _BnFolding, DepthwiseConv2DBnAct
):
    """`DepthwiseConv2DBnAct(has_bn=True)` with its BatchNorm folded.

    As `QuantConv2DBnFoldAct`, for a depthwise convolution: output channel
    `c * depth_multiplier + m` is scaled by its own `gamma / sigma` and, with
    `per_channel=True`, quantized with its own range.

    Args:
        freeze_bn: Training step from which BatchNorm statistics are frozen.
        num_bits: Bit width of the weights, in `[2, 16]`.
        per_channel: One weight range per output channel.
        symmetric: Symmetric weight range.
        narrow_range: Weight grid `[1, 2**num_bits - 1]`.
        quant_delay: Training steps before the weights are quantized.
        *args, **kwargs: The arguments of `DepthwiseConv2DBnAct`
            (`has_bn=True`).

    Raises:
        ValueError: for `has_bn=False` or another invalid argument.

    Example:

    >>> layer = QuantDepthwiseConv2DBnFoldAct(3, has_bn=True, per_channel=True)
    >>> layer(np.ones((1, 8, 8, 4), "float32")).shape
    TensorShape([1, 6, 6, 4])
    """
