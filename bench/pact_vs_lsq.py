"""PACT against LSQ: `examples/resnet_quant.py` with PACT's clipping gradient.

PACT (Choi et al. 2018) learns a ReLU's clipping level `alpha` from the
values it clips only: `d alpha = sum(dy where x >= alpha) + l2 * alpha`,
with an L2 penalty (2e-4 in the paper) pulling `alpha` down. LSQ's step
gradient also has a term from the values inside the range (`round(v) - v`).
On a grid whose zero point is its lowest level (a ReLU output), `alpha` is
`qp * step`, so PACT is LSQ with the inside term dropped and the penalty
added. This script runs the ResNet example with that gradient for such
activation grids (weights, and signed activations, keep LSQ's), to measure
whether keras-qat should offer PACT. It is a measurement, not a feature:
it swaps `keras_qat.layers.learned_range.learned_step_fake_quant`.

Usage (the flags are the example's; --range_learning is needed):
    python bench/pact_vs_lsq.py --float_model=runs/r13/resnet20_float.keras \\
        --num_bits=4,4 --range_learning --qat_lr=1e-3 --qat_epochs=2 --first_last_bits=8
Environment: PACT_L2, the penalty (default 2e-4).
"""

import os
import runpy
import sys

import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from keras_qat import quantizers  # noqa: E402
from keras_qat.layers import learned_range  # noqa: E402

L2 = float(os.environ.get("PACT_L2", "2e-4"))
LSQ = learned_range.learned_step_fake_quant


def pact_step_fake_quant(x, step, zero_point, num_bits=8, narrow_range=False, grad_scale=1.0):
    """`learned_step_fake_quant` with PACT's step gradient on ReLU-type
    grids (zero point at the lowest level); LSQ's elsewhere."""
    if isinstance(zero_point, (int, float)):  # weights: symmetric, LSQ
        return LSQ(x, step, zero_point, num_bits, narrow_range, grad_scale)
    qmin, qmax = quantizers.quant_levels(num_bits, narrow_range)
    zero = tf.cast(tf.convert_to_tensor(zero_point), tf.float32)
    lowest, highest = qmin - zero, qmax - zero
    dtype = x.dtype

    @tf.custom_gradient
    def quantize(values, step):
        s = tf.maximum(step, learned_range.MIN_STEP)
        y = quantizers.fake_quant(
            values, lowest * s, highest * s, num_bits=num_bits, narrow_range=narrow_range
        )

        def grad(dy):
            v = values / s
            inside = tf.logical_and(v >= lowest, v <= highest)
            lsq_term = tf.where(
                inside, tf.floor(v + 0.5) - v, tf.where(v < lowest, lowest, highest)
            )
            lsq_grad = tf.reduce_sum(dy * lsq_term) * grad_scale
            clipped = tf.reduce_sum(tf.where(v > highest, dy, tf.zeros_like(dy)))
            pact_grad = (clipped + L2 * highest * s) * highest  # d alpha * d alpha / d step
            step_grad = tf.where(tf.equal(lowest, 0.0), pact_grad, lsq_grad)
            return tf.where(inside, dy, tf.zeros_like(dy)), step_grad

        return y, grad

    step = tf.convert_to_tensor(step, tf.float32)
    return tf.cast(quantize(tf.cast(x, tf.float32), step), dtype)


if __name__ == "__main__":
    learned_range.learned_step_fake_quant = pact_step_fake_quant
    sys.argv = ["resnet_quant.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(ROOT, "examples", "resnet_quant.py"), run_name="__main__")
