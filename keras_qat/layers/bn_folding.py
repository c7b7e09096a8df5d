"""BatchNorm folded into fake-quantized weights: the folded layers' call.

An integer model has no BatchNorm: it is folded into the weights and bias,
`W_fold = W * gamma / sigma`, `b_fold = beta + gamma * (b - mu) / sigma`
(`sigma = sqrt(moving_variance + epsilon)`, per output channel). A folded
layer fake-quantizes exactly `W_fold` computed from the *moving* statistics,
so the quantized weights are the deployed ones and do not jitter with batch
statistics (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018, section
2.4, "batch norm folding with correction"). One convolution per call,
`y = conv(x, fake_quant(W_fold))`:

- training, before `freeze_bn` steps: the per-channel factor is divided
  back out, `z = y * sigma / gamma + b` (the convolution with the quantized
  weights, unfolded), and `z` is batch-normalized with its own batch
  statistics `mu_B`, `sigma_B`: `gamma * (z - mu_B) / sigma_B + beta`, which
  is `y * sigma / sigma_B + beta - gamma * (mu_B - b) / sigma_B`. The moving
  statistics follow `mu_B` and `sigma_B**2` with the BatchNorm's momentum.
  (PyTorch's `ConvBn2d` does the same; the previous scheme here computed a
  second, float convolution for the statistics, which doubled the cost.)
- from `freeze_bn` steps on, and in inference: `y + b_fold`, with `b_fold`
  on the int32 grid of the integer kernel (`quantizers.bias_on_grid`); the
  moving statistics no longer change.

In training both cases are a per-channel affine map of `y` (scale, shift;
the batch statistics' from `keras_qat.layers.batch_statistics.batch_affine`);
both maps are computed (the batch statistics are two reductions of `y`) and
the one of the current step is selected, then applied in one pass, which XLA
fuses with what follows. A conditional that skipped the statistics after
`freeze_bn` saved no time and cost peak memory (docs/measurements.md); it
also could not hold the cross-replica reduction of `synchronized=True`.

With `synchronized=True` the batch statistics are those of the global batch
under a `tf.distribute` strategy (Keras' `BatchNormalization(synchronized=
True)` semantics); otherwise each replica uses its own shard.

A channel with `gamma = 0` has a zero folded kernel: the division back out
is `divide_no_nan`, the channel's output is `beta`, its batch statistics
are those of `b`, and everything stays finite.
"""

import collections

import tensorflow as tf

from keras_qat.layers import batch_statistics
from keras_qat.quantizers import bias_on_grid

FoldValues = collections.namedtuple(
    "FoldValues", "gamma beta moving_mean moving_variance bias factor"
)
FoldValues.__doc__ = """What folding needs, float32, per output channel: the
BatchNorm's `gamma` (ones with `scale=False`), `beta` (zeros with
`center=False`), moving statistics, the linear layer's `bias` (zeros
without one) and the fold factor `gamma / sigma`."""


def read_fold_values(layer):
    """A folded layer's `FoldValues`, each variable read once."""
    bn = batch_statistics.read_parameters(layer.bn)
    linear = layer.linear_layer
    bias = tf.cast(linear.bias, tf.float32) if linear.use_bias else tf.zeros_like(bn.moving_mean)
    factor = bn.gamma / tf.sqrt(bn.moving_variance + layer.bn.epsilon)
    return FoldValues(*bn, bias, factor)


def folded_kernel(layer, values=None):
    """`W * gamma / sigma` (moving statistics), per output channel, float32
    (`values`: `read_fold_values(layer)`, read here when not given)."""
    v = read_fold_values(layer) if values is None else values
    return tf.cast(layer.kernel(), tf.float32) * v.factor


def folded_bias(layer, values=None):
    """`beta + gamma * (b - moving_mean) / sigma`, float32 (`values`:
    `read_fold_values(layer)`, read here when not given)."""
    v = read_fold_values(layer) if values is None else values
    return v.beta + v.factor * (v.bias - v.moving_mean)


def folded_call(layer, inputs, training, input_scale):
    """A folded layer's output before its activation (see module docstring)."""
    quantizer = layer.weight_quantizer
    step = quantizer.steps(tf.convert_to_tensor(quantizer.step))  # before this call's count
    values = read_fold_values(layer)
    weights = quantizer.quantize_weights(
        folded_kernel(layer, values), training, int4_storage=layer.int4_storage
    )
    outputs = tf.cast(layer.kernel_op(inputs, tf.cast(weights.values, inputs.dtype)), tf.float32)
    # The deployed map: the folded bias on the int32 grid.
    bias = bias_on_grid(folded_bias(layer, values), input_scale, weights.scale)
    if not (training and layer.bn.trainable):  # a frozen BatchNorm uses its moving statistics
        return tf.cast(outputs + bias, inputs.dtype)
    before_freeze = step < layer.freeze_bn
    # Both maps are computed and one selected (see the module docstring).
    parameters = batch_statistics.BatchNormParameters(*values[:4])
    affine = batch_statistics.batch_affine(
        layer.bn, parameters, values.bias, outputs, values.factor
    )
    scale = tf.where(before_freeze, affine.scale, 1.0)
    shift = tf.where(before_freeze, affine.shift, bias)
    batch_statistics.update_moving_statistics(
        layer.bn, parameters, affine.mean, affine.variance, before_freeze
    )
    return tf.cast(outputs * scale + shift, inputs.dtype)
