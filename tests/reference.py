"""Independent numpy implementations of the quantization arithmetic.

Written from the formulas in TensorFlow's documentation of
FakeQuantWithMinMaxVars and Jacob et al. 2018, in float32, without calling
TensorFlow.
"""

import numpy as np
import tensorflow as tf

f32 = np.float32


def grid(num_bits, narrow_range):
    return (1 if narrow_range else 0), 2**num_bits - 1


def nudge(min_val, max_val, num_bits, narrow_range, symmetric=False):
    """Returns (nudged_min, nudged_max, scale) as float32 scalars."""
    min_val, max_val = f32(min(f32(min_val), 0)), f32(max(f32(max_val), 0))
    if symmetric:
        bound = max(-min_val, max_val)
        min_val, max_val = f32(-bound), f32(bound)
    qmin, qmax = grid(num_bits, narrow_range)
    if max_val == min_val:
        return f32(0), f32(0), f32(0)
    scale = f32((max_val - min_val) / f32(qmax - qmin))
    zero_point_from_min = f32(f32(qmin) - min_val / scale)
    zero_point = f32(np.clip(np.floor(zero_point_from_min + f32(0.5)), qmin, qmax))
    return f32((qmin - zero_point) * scale), f32((qmax - zero_point) * scale), scale


def fake_quant_levels(x, min_val, max_val, num_bits=8, narrow_range=False, symmetric=False):
    """Per-tensor reference: (integer level of each element, nudged_min, scale, shifted)."""
    x = np.asarray(x, f32)
    nudged_min, nudged_max, scale = nudge(min_val, max_val, num_bits, narrow_range, symmetric)
    if scale == 0:
        zeros = np.zeros_like(x)
        return zeros, nudged_min, scale, zeros
    shifted = (np.clip(x, nudged_min, nudged_max) - nudged_min) / scale
    return np.floor(shifted + f32(0.5)), nudged_min, scale, shifted


def fake_quant(x, min_val, max_val, num_bits=8, narrow_range=False, symmetric=False):
    levels, nudged_min, scale, _ = fake_quant_levels(
        x, min_val, max_val, num_bits, narrow_range, symmetric
    )
    return (levels * scale + nudged_min).astype(f32)


# TensorFlow 2.20's int8 BATCH_MATMUL rounds near-ties one step apart from
# 2.21's (the same .tflite file: 99.84 % against 100 % of outputs exact,
# BUILD.md); the Keras model rounds as 2.21's does. Through a softmax and a
# second matmul that is up to 3 steps on up to 15 % of an attention's
# outputs (measured 2026-12-08 in a TF 2.20 venv).
OLD_BATCH_MATMUL = tuple(int(p) for p in tf.__version__.split(".")[:2]) < (2, 21)
# (share of outputs exact, largest difference in steps) an attention's int8
# model reaches against the Keras model.
ATTENTION_PARITY = (0.8, 3.001) if OLD_BATCH_MATMUL else (0.999, 1.001)
