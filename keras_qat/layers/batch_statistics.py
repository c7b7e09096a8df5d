"""A fusion layer's BatchNorm in training, from the linear output without bias.

In training a BatchNorm normalizes with its batch's statistics, so a bias
added before it cancels out: `BN(y + b) = gamma * (y - mean_y) / sigma_B +
beta`, and only the moving mean sees `b` (`mean_{y+b} = mean_y + b`). The
quantized layers compute their BatchNorm in training from `y`, the conv or
matmul without its bias, as the per-channel affine map `y * scale + shift`:

- an unfolded layer (`Quant...BnAct`) does not add its bias before a
  training BatchNorm (`train_without_bias`); its result equals Keras'
  `BatchNormalization` on `y + b` up to float rounding, and the moving
  statistics follow the same updates (the time it saves:
  docs/measurements.md);
- a folded layer (`keras_qat.layers.bn_folding`) gets `y` from its folded
  kernel and divides the fold factor back out (`batch_affine(..., factor)`).

A frozen BatchNorm (`trainable=False`) and inference use the moving
statistics, where the bias does not cancel: those paths add it as Keras
does.
"""

import collections

import keras
import tensorflow as tf

BatchNormParameters = collections.namedtuple(
    "BatchNormParameters", "gamma beta moving_mean moving_variance"
)
BatchNormParameters.__doc__ = """A BatchNorm's variables as float32 tensors,
each read once (`gamma` is ones with `scale=False`, `beta` zeros with
`center=False`)."""

BatchAffine = collections.namedtuple("BatchAffine", "scale shift mean variance")
BatchAffine.__doc__ = """The training BatchNorm as `y * scale + shift`, per
channel, and the batch `mean` and `variance` that the moving statistics
follow (those of the layer's output with its bias)."""


def read_parameters(bn):
    """`BatchNormParameters` of a Keras `BatchNormalization` (every use of a
    Keras variable is a read op of its own, and this runs every step)."""
    mean = tf.cast(bn.moving_mean, tf.float32)
    variance = tf.cast(bn.moving_variance, tf.float32)
    gamma = tf.ones_like(variance) if bn.gamma is None else tf.cast(bn.gamma, tf.float32)
    beta = tf.zeros_like(mean) if bn.beta is None else tf.cast(bn.beta, tf.float32)
    return BatchNormParameters(gamma, beta, mean, variance)


def batch_affine(bn, parameters, bias, outputs, factor=None):
    """The `BatchAffine` of a training BatchNorm on `outputs / factor + bias`.

    `outputs` is float32 with the channels last; `factor` is a folded
    layer's `gamma / sigma` (None: 1), whose zeros give a zero scale (the
    channel's output is `beta`). The statistics over all but the last axis
    are those of the global batch with `bn.synchronized`.
    """
    axes = list(range(outputs.shape.rank - 1))
    mean, variance = keras.ops.moments(outputs, axes, synchronized=bn.synchronized)
    gamma = parameters.gamma
    if factor is not None:  # the statistics of outputs / factor
        inverse = tf.math.divide_no_nan(1.0, factor)  # 0 where gamma = 0
        variance = variance * tf.square(inverse)
        gamma = inverse * gamma
    scale = gamma * tf.math.rsqrt(variance + bn.epsilon)
    shift = parameters.beta - mean * scale
    if factor is not None:
        mean = mean * inverse
    return BatchAffine(scale, shift, mean + bias, variance)


def update_moving_statistics(bn, parameters, mean, variance, update=True):
    """Moves the BatchNorm's statistics towards the batch's, as Keras'
    `BatchNormalization` does; where `update` (a boolean tensor) is False
    they stay unchanged, to the bit."""
    pairs = (
        (bn.moving_mean, parameters.moving_mean, mean),
        (bn.moving_variance, parameters.moving_variance, variance),
    )
    for statistic, old, batch_value in pairs:
        moved = old * bn.momentum + tf.stop_gradient(batch_value) * (1.0 - bn.momentum)
        statistic.assign(moved if update is True else tf.where(update, moved, old))


def train_without_bias(bn, outputs, bias):
    """Keras' training `BatchNormalization` on `outputs + bias`, computed
    from `outputs` (see the module docstring); updates the moving
    statistics.

    `bias` gets a zero gradient (not None, so that optimizers and weight
    decay treat it as Keras' layers do).
    """
    parameters = read_parameters(bn)
    values = tf.cast(outputs, tf.float32)
    bias = tf.cast(bias, tf.float32)
    affine = batch_affine(bn, parameters, bias, values)
    update_moving_statistics(bn, parameters, affine.mean, affine.variance)
    shift = affine.shift + 0.0 * bias  # the bias cancels: its gradient is 0
    return tf.cast(values * affine.scale + shift, bn.compute_dtype)
