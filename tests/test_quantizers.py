import numpy as np
import pytest
import reference
import tensorflow as tf

from keras_qat import quantizers, stored_scale
from keras_qat.layers.shared_range import QuantConcatenate
from keras_qat.requantization import multiplied, requantized


def assert_matches_reference(y, x, min_val, max_val, num_bits, narrow_range, symmetric):
    """`y` (per tensor) equals the reference level by level.

    TensorFlow's kernel computes `level * scale + nudged_min` with fused
    multiply-adds, so values are compared to float32 rounding, and levels
    exactly. An element whose shifted value lies within a few float32 ulps of
    a .5 tie may
    round either way in float32 arithmetic; those are counted and must be
    rare, and they must still be within one level.
    """
    levels, nudged_min, scale, shifted = reference.fake_quant_levels(
        x, min_val, max_val, num_bits, narrow_range, symmetric
    )
    y = np.asarray(y)
    if scale == 0:
        np.testing.assert_array_equal(y, np.zeros_like(x))
        return
    got_levels = np.round((y.astype(np.float64) - nudged_min) / scale)
    # A few float32 ulps of `x - nudged_min`, in levels (large at 16 bits).
    ulps = 8 * np.finfo(np.float32).eps * (np.abs(x) + abs(nudged_min))
    tie_window = 1e-4 + ulps / scale
    near_tie = np.abs(shifted - np.floor(shifted) - 0.5) < tie_window
    mismatch = got_levels != levels
    assert not np.any(mismatch & ~near_tie), (
        f"levels differ away from ties at x={x[mismatch & ~near_tie][:5]}"
    )
    assert np.all(np.abs(got_levels - levels) <= 1)
    assert mismatch.sum() <= max(2, near_tie.sum() // 2 + x.size // 2000)
    expected = levels * scale + nudged_min
    span = max(abs(nudged_min), abs(nudged_min + scale * (2**num_bits - 1)))
    ok = ~mismatch
    np.testing.assert_allclose(y[ok], expected[ok], rtol=0, atol=4e-7 * span)


def random_inputs(rng, lo, hi, n=20_000):
    width = max(hi - lo, 1.0)
    return np.concatenate(
        [
            rng.uniform(lo - 0.2 * width, hi + 0.2 * width, n),
            np.linspace(lo, hi, 4001),
            [0.0, lo, hi],
        ]
    ).astype(np.float32)


@pytest.mark.parametrize("num_bits", [2, 4, 7, 8, 16])
@pytest.mark.parametrize("narrow_range", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_matches_numpy(num_bits, narrow_range, symmetric):
    rng = np.random.default_rng(num_bits)
    for min_val, max_val in [(-1.3, 2.1), (-0.01, 5.0), (-3.0, 0.2)]:
        x = random_inputs(rng, min_val, max_val)
        y = quantizers.fake_quant(
            x, min_val, max_val, num_bits, symmetric=symmetric, narrow_range=narrow_range
        )
        assert y.dtype == tf.float32 and y.shape == x.shape
        assert_matches_reference(y.numpy(), x, min_val, max_val, num_bits, narrow_range, symmetric)


@pytest.mark.parametrize(
    "min_val, max_val",
    [
        (0.5, 2.0),  # min > 0: the range becomes [0, 2], not [0, 1.5]
        (-2.0, -0.5),  # max < 0: the range becomes [-2, 0]
        (0.0, 0.0),  # zero range: everything maps to 0
        (-1.0, 1.0),
    ],
)
def test_edge_ranges(min_val, max_val):
    x = np.linspace(-3, 3, 601).astype(np.float32)
    y = quantizers.fake_quant(x, min_val, max_val).numpy()
    assert_matches_reference(y, x, min_val, max_val, 8, False, False)
    assert np.all(np.isfinite(y))
    if (min_val, max_val) == (0.5, 2.0):
        assert y.min() == 0.0 and y.max() == pytest.approx(2.0, abs=1e-6)
    if (min_val, max_val) == (-2.0, -0.5):
        assert y.max() == 0.0 and y.min() == pytest.approx(-2.0, abs=1e-6)


def test_zero_is_exact_and_ties_round_up():
    # Scale 1/16 (a power of two) and zero point 128: every value below is
    # exact in float32, so .5 ties are exact and must round up.
    min_val, max_val = -8.0, 127 / 16
    ties = (np.arange(-128, 127) + 0.5).astype(np.float32) / 16
    y = quantizers.fake_quant(ties, min_val, max_val).numpy()
    np.testing.assert_array_equal(y, ties + np.float32(1 / 32))
    assert quantizers.fake_quant(np.float32(0.0), -0.37, 1.91).numpy() == 0.0


def test_symmetric_narrow_range_is_the_signed_grid():
    x = np.linspace(-2, 2, 1001).astype(np.float32)
    y = quantizers.fake_quant(x, -0.5, 1.27, num_bits=8, symmetric=True, narrow_range=True).numpy()
    scale = np.float32(2 * 1.27 / 254)
    levels = y / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert round(levels.min()) == -127 and round(levels.max()) == 127


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_per_channel_matches_per_tensor_reference(axis, rank):
    rng = np.random.default_rng(rank)
    shape = [3, 4, 5, 6][:rank]
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    channels = shape[axis]
    mins = -rng.uniform(0.1, 3, channels).astype(np.float32)
    maxs = rng.uniform(0.1, 3, channels).astype(np.float32)
    mins[0], maxs[0] = 0.0, 0.0  # one zero-range channel
    y = quantizers.fake_quant(x, mins, maxs, num_bits=5, axis=axis).numpy()
    for c in range(channels):
        xc = np.take(x, c, axis=axis).ravel()
        yc = np.take(y, c, axis=axis).ravel()
        assert_matches_reference(yc, xc, mins[c], maxs[c], 5, False, False)


def numpy_gradients(x, dy, min_val, max_val, num_bits, narrow_range):
    nudged_min, nudged_max, _ = reference.nudge(min_val, max_val, num_bits, narrow_range)
    inside = (x >= nudged_min) & (x <= nudged_max)
    return dy * inside, dy[x < nudged_min].sum(), dy[x > nudged_max].sum()


@pytest.mark.parametrize("num_bits, narrow_range", [(8, False), (4, True), (2, False)])
def test_gradients_equal_tf_gradient_op_and_numpy(num_bits, narrow_range):
    rng = np.random.default_rng(0)
    x = tf.constant(random_inputs(rng, -1.1, 0.9, 2000))
    dy = tf.constant(rng.standard_normal(x.shape).astype(np.float32))
    min_val, max_val = tf.Variable(-1.1), tf.Variable(0.9)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantizers.fake_quant(x, min_val, max_val, num_bits, narrow_range=narrow_range)
    dx, dmin, dmax = tape.gradient(y, [x, min_val, max_val], output_gradients=dy)
    tf_dx, tf_dmin, tf_dmax = tf.quantization.fake_quant_with_min_max_vars_gradient(
        dy, x, -1.1, 0.9, num_bits=num_bits, narrow_range=narrow_range
    )
    np.testing.assert_array_equal(dx, tf_dx)
    np.testing.assert_allclose([dmin, dmax], [tf_dmin, tf_dmax], rtol=1e-6)
    np_dx, np_dmin, np_dmax = numpy_gradients(
        x.numpy(), dy.numpy(), -1.1, 0.9, num_bits, narrow_range
    )
    np.testing.assert_array_equal(dx, np_dx)
    np.testing.assert_allclose([dmin, dmax], [np_dmin, np_dmax], rtol=1e-4)
    assert np.count_nonzero(np_dx == 0) > 0  # some elements were clipped


def test_per_channel_gradients_on_axis_0():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((3, 50)).astype(np.float32) * 2)
    dy = tf.constant(rng.standard_normal((3, 50)).astype(np.float32))
    mins = tf.Variable([-1.0, -0.5, -2.0])
    maxs = tf.Variable([1.0, 0.7, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = quantizers.fake_quant(x, mins, maxs, axis=0)
    dx, dmin, dmax = tape.gradient(y, [x, mins, maxs], output_gradients=dy)
    tf_dx, tf_dmin, tf_dmax = tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient(
        tf.transpose(dy), tf.transpose(x), mins, maxs
    )
    np.testing.assert_array_equal(dx, tf.transpose(tf_dx))
    np.testing.assert_allclose(dmin, tf_dmin, rtol=1e-6)
    np.testing.assert_allclose(dmax, tf_dmax, rtol=1e-6)
    for c in range(3):
        np_dx, np_dmin, np_dmax = numpy_gradients(
            x.numpy()[c], dy.numpy()[c], mins.numpy()[c], maxs.numpy()[c], 8, False
        )
        np.testing.assert_array_equal(dx[c], np_dx)
        np.testing.assert_allclose([dmin[c], dmax[c]], [np_dmin, np_dmax], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(dtype):
    x = tf.cast(tf.linspace(-2.0, 2.0, 101), dtype)
    y = quantizers.fake_quant(x, -1.0, 1.5)
    assert y.dtype == tf.as_dtype(dtype)
    expected = quantizers.fake_quant(tf.cast(x, tf.float32), -1.0, 1.5)
    np.testing.assert_array_equal(y.numpy(), tf.cast(expected, dtype).numpy())


def test_xla_compiles_and_matches_within_one_step():
    x = tf.constant(np.random.default_rng(2).uniform(-2, 2, 10_000).astype(np.float32))
    eager = quantizers.fake_quant(x, -1.3, 1.7)
    compiled = tf.function(lambda t: quantizers.fake_quant(t, -1.3, 1.7), jit_compile=True)(x)
    _, _, scale = reference.nudge(-1.3, 1.7, 8, False)
    assert np.max(np.abs(eager - compiled)) <= scale * 1.0001


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_bits=1), "num_bits"),
        (dict(num_bits=17), "num_bits"),
        (dict(num_bits=8.0), "num_bits"),
        (dict(axis=3), "axis"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantizers.fake_quant(tf.zeros((2, 3)), [-1.0] * 3, [1.0] * 3, **{"axis": -1, **kwargs})


def test_range_shape_must_match_channels():
    with pytest.raises(ValueError, match="one per channel"):
        quantizers.fake_quant(tf.zeros((2, 3)), [-1.0, -1.0], [1.0, 1.0], axis=1)
    with pytest.raises(ValueError, match="scalars"):
        quantizers.fake_quant(tf.zeros((2, 3)), [-1.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="floating-point"):
        quantizers.fake_quant(tf.zeros((2, 3), tf.int32), -1.0, 1.0)


def _boundary_inputs(min_val, max_val, num_bits, narrow_range):
    """Random values plus the nudged bounds, 0, 6 and their float32 neighbours."""
    nudged_min, nudged_max, _ = reference.nudge(min_val, max_val, num_bits, narrow_range)
    edges = np.array([nudged_min, nudged_max, 0.0, 6.0], np.float32)
    around = np.concatenate(
        [edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf))]
    )
    rng = np.random.default_rng(7)
    return np.concatenate([around, rng.uniform(-9, 9, 500).astype(np.float32)])


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize(
    "min_val, max_val, num_bits, narrow_range",
    [(-2.0, 5.0, 8, False), (0.0, 6.0, 8, False), (0.0, 3.7, 4, True), (-1.3, 8.2, 7, False)],
)
def test_training_fake_quant_equals_the_two_tensorflow_ops(
    activation, min_val, max_val, num_bits, narrow_range
):
    """Forward: fake_quant(activation(x)); gradient: TensorFlow's own
    gradients of the activation op and the fake-quant op, chained."""
    x = tf.constant(_boundary_inputs(min_val, max_val, num_bits, narrow_range))
    ops = {None: tf.identity, "relu": tf.nn.relu, "relu6": tf.nn.relu6}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        expected = tf.quantization.fake_quant_with_min_max_vars(
            ops[activation](x), min_val, max_val, num_bits=num_bits, narrow_range=narrow_range
        )
        got = quantizers.fake_quant_for_training(
            x, min_val, max_val, num_bits, narrow_range=narrow_range, activation=activation
        )
    np.testing.assert_array_equal(got, expected)
    dy = tf.constant(np.random.default_rng(3).uniform(0.5, 1.5, x.shape), tf.float32)
    np.testing.assert_array_equal(
        tape.gradient(got, x, output_gradients=dy), tape.gradient(expected, x, output_gradients=dy)
    )


def test_training_fake_quant_keeps_half_precision_inputs():
    x = tf.constant([-1.0, 0.25, 3.0], tf.float16)
    y = quantizers.fake_quant_for_training(x, -1.0, 1.0, 8, symmetric=True)
    assert y.dtype == tf.float16
    np.testing.assert_allclose(
        y.numpy(), reference.fake_quant([-1.0, 0.25, 3.0], -1, 1, symmetric=True), atol=1e-3
    )


def test_requantized_follows_xnnpacks_formula_within_its_ratios_and_passes_gradients():
    """XNNPACK's int8 QUANTIZE: `floor((lrintf(256 * ratio) * level + 128) / 256)`
    (its qs8 convert kernels); outside ratios 2**-8..2**7 or with a scale of
    0 (a grid not quantizing yet), the value is left for the next FakeQuant."""
    levels = np.arange(-255, 256, dtype="float32")
    for ratio in (0.0188, 0.613, 0.9077, 1.4058):
        output_scale = 0.03
        x = levels * (ratio * output_scale)
        multiplier = np.rint(256 * np.float32(ratio))
        expected = np.floor((multiplier * levels + 128) / 256) * output_scale
        got = requantized(x, ratio * output_scale, output_scale).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    x = tf.constant(levels * 0.5)
    for input_scale, output_scale in ((0.5, 0.0), (0.0, 0.5), (0.5, 1000.0), (1000.0, 0.5)):
        np.testing.assert_array_equal(requantized(x, input_scale, output_scale).numpy(), x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = requantized(x, 0.5, 0.03)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.ones(levels.shape))


@pytest.mark.parametrize("num_bits", [8, 16])
def test_a_concatenation_requantizes_as_xnnpack_on_8_bit_grids_only(num_bits):
    """An input on a grid of its own (step 0.004) moved onto the shared one:
    XNNPACK's rounding on int8 grids; wider grids (int16, TFLite's built-in
    kernels) keep the float rounding."""
    layer = QuantConcatenate(quantize_inputs=[False, True], quantizer={"num_bits": num_bits})
    own = tf.constant(np.arange(-127, 128, dtype="float32")[None] * 0.004)
    other = tf.constant(np.linspace(-1.9, 1.9, 255, dtype="float32")[None])
    layer([own, other], training=True)  # sets the shared range
    plain = layer([own, other]).numpy()
    moved = layer([own, other], input_scales=[tf.constant(0.004)]).numpy()
    assert (np.abs(moved - plain).max() > 0) == (num_bits == 8)


@pytest.mark.parametrize("on_tpu", [False, True])
def test_grid_scale_is_the_converters_float64_scale_in_every_mode(on_tpu, monkeypatch):
    """The TFLite converter stores `float32((max - min) / levels)` computed
    in float64. A float32 division differed from it for 28 of 102 trained
    ranges, and in a `tf.function` (a product with the reciprocal) for 67;
    XNNPACK's MUL and QUANTIZE round near-ties from these scales. On TPUs
    (no float64) it is computed in float32 arithmetic."""
    monkeypatch.setattr(stored_scale, "_on_tpu", lambda: on_tpu)
    rng = np.random.default_rng(0)
    low = -np.abs(rng.standard_normal(20000) * 10.0 ** rng.uniform(-4, 3, 20000))
    high = np.abs(rng.standard_normal(20000) * 10.0 ** rng.uniform(-4, 3, 20000))
    low, high = low.astype("float32"), high.astype("float32")
    low[:100] = 0.0
    for num_bits, narrow_range, symmetric in ((8, False, False), (8, True, True), (16, True, True)):
        levels = 2**num_bits - 1 - narrow_range
        bound = np.maximum(-low, high) if symmetric else None
        lo, hi = (-bound, bound) if symmetric else (low, high)
        exact = (hi.astype("float64") - lo.astype("float64")) / levels
        expected = exact.astype("float32")
        # float64 results exactly between two float32s may round either way.
        tie = np.abs(exact - expected) == np.spacing(expected) / 2

        def scale(a, b, num_bits=num_bits, narrow_range=narrow_range, symmetric=symmetric):
            return quantizers.grid_scale(a, b, num_bits, symmetric, narrow_range)

        for mode in (scale, tf.function(scale)):
            got = mode(tf.constant(low), tf.constant(high)).numpy()
            np.testing.assert_array_equal(got[~tie], expected[~tie])
        # XLA contracts some float32 operations: a few more round the other way.
        jit = tf.function(scale, jit_compile=True)(tf.constant(low), tf.constant(high)).numpy()
        assert np.mean(jit[~tie] != expected[~tie]) <= (1e-3 if on_tpu else 0.0)


@pytest.mark.parametrize("strategy", ["TPUStrategy", "TPUStrategyV2", "MirroredStrategy"])
def test_the_scale_avoids_float64_only_on_tpus(strategy, monkeypatch):
    """TPUs have no float64: under their strategies the scale is computed
    in float32 arithmetic, elsewhere in float64 as the converter does."""
    monkeypatch.setattr(tf.distribute, "get_strategy", lambda: type(strategy, (), {})())
    spec = tf.TensorSpec([], tf.float32)
    scale = tf.function(lambda low, high: stored_scale.converter_scale(low, high, 255.0))
    operations = scale.get_concrete_function(spec, spec).graph.get_operations()
    uses_float64 = any(op.outputs and op.outputs[0].dtype == tf.float64 for op in operations)
    assert uses_float64 == (strategy == "MirroredStrategy")


def test_multiplied_follows_xnnpacks_mul_and_passes_gradients():
    """XNNPACK's int8 MUL: the product of the levels times the float32
    `(scale_a * scale_b) / output_scale`, to nearest, ties to even; a
    float rounding of the product differs within float error of ties."""
    rng = np.random.default_rng(0)
    level_a = rng.integers(-128, 128, 5000).astype("float32")
    level_b = rng.integers(-128, 128, 5000).astype("float32")
    differs = 0
    # Power-of-two scales make exact ties (half of the odd products), which
    # XNNPACK rounds to even and a float rounding up.
    for scale_a, scale_b, output_scale in ((2**-4, 2**-8, 2**-11), (0.0113, 0.0231, 0.0071)):
        scale_a, scale_b, output_scale = np.float32([scale_a, scale_b, output_scale])
        product = (level_a * scale_a) * (level_b * scale_b)
        ratio = np.float32(scale_a * scale_b) / output_scale
        expected = np.round(level_a * level_b * ratio) * output_scale  # ties to even
        got = multiplied(product, (scale_a, scale_b), output_scale).numpy()
        np.testing.assert_array_equal(got, expected.astype("float32"))
        differs += np.sum(np.floor(product / output_scale + 0.5) != np.round(got / output_scale))
    assert differs > 0  # the float rounding is not XNNPACK's on these levels
    x = tf.constant(level_a * 0.01)
    for scales in ((0.0, 0.5, 0.1), (0.1, 0.1, 0.0), (1000.0, 1.0, 0.001)):
        np.testing.assert_array_equal(multiplied(x, scales[:2], scales[2]).numpy(), x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = multiplied(x, (0.1, 0.1), 0.03)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.ones(x.shape))
