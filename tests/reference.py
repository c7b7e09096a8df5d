"""Independent numpy implementations of the quantization arithmetic.

Written from the formulas in TensorFlow's documentation of
FakeQuantWithMinMaxVars and Jacob et al. 2018, in float32, without calling
TensorFlow.
"""

import numpy as np

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
