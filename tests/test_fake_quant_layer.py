import keras
import numpy as np
import pytest
import reference
import tensorflow as tf

from keras_qat import FakeQuant


def numpy_observer(batches, ema, decay, axis=None):
    """Reference range after each batch: first batch sets it, then EMA."""
    ranges = []
    lo = hi = None
    for batch in batches:
        finite = np.where(np.isfinite(batch), batch, 0)
        if axis is None:
            b_lo, b_hi = min(finite.min(), 0), max(finite.max(), 0)
        else:
            axes = tuple(d for d in range(batch.ndim) if d != axis % batch.ndim)
            b_lo = np.minimum(finite.min(axis=axes), 0)
            b_hi = np.maximum(finite.max(axis=axes), 0)
        if lo is None or not ema:
            lo, hi = np.float32(b_lo), np.float32(b_hi)
        else:
            lo = np.float32(decay * lo + (1 - decay) * b_lo)
            hi = np.float32(decay * hi + (1 - decay) * b_hi)
        ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("ema", [True, False])
def test_per_tensor_range_follows_numpy_observer(ema):
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 6)) * (i + 1) + 0.5).astype("float32") for i in range(5)]
    layer = FakeQuant(ema=ema, ema_decay=0.9)
    expected = numpy_observer(batches, ema, 0.9)
    for step, (batch, (lo, hi)) in enumerate(zip(batches, expected)):
        y = layer(batch, training=True)
        np.testing.assert_allclose(layer.min.numpy(), lo, rtol=1e-6)
        np.testing.assert_allclose(layer.max.numpy(), hi, rtol=1e-6)
        assert layer.step.numpy() == step + 1
        np.testing.assert_allclose(y, reference.fake_quant(batch, lo, hi), atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1])
def test_per_channel_range_follows_numpy_observer(axis):
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((3, 4, 5)).astype("float32") * 3 for _ in range(4)]
    layer = FakeQuant(per_channel=True, axis=axis, ema_decay=0.5)
    for batch, (lo, hi) in zip(batches, numpy_observer(batches, True, 0.5, axis)):
        layer(batch, training=True)
        assert layer.min.shape == (batch.shape[axis],)
        np.testing.assert_allclose(layer.min.numpy(), lo, rtol=1e-6)
        np.testing.assert_allclose(layer.max.numpy(), hi, rtol=1e-6)


def test_quant_delay_passes_through_exactly_until_the_delay():
    x = np.linspace(-1, 1, 37).astype("float32").reshape(1, 37)
    layer = FakeQuant(num_bits=4, quant_delay=3)
    for step in range(3):
        if step > 0:  # after 1 and 2 training steps, inference is delayed too
            np.testing.assert_array_equal(layer(x, training=False), x)
        np.testing.assert_array_equal(layer(x, training=True), x)
    # 3 steps have passed: inference quantizes, and so does the 4th step,
    # with the range learned during the delay.
    y_inference = layer(x, training=False).numpy()
    y = layer(x, training=True).numpy()
    np.testing.assert_array_equal(y_inference, y)
    lo, hi = layer.min.numpy(), layer.max.numpy()
    assert (lo, hi) == (-1.0, 1.0)
    np.testing.assert_allclose(y, reference.fake_quant(x, lo, hi, 4), atol=1e-6)
    assert len(np.unique(y)) <= 16
    np.testing.assert_array_equal(layer(x, training=False), y)


def test_untrained_layer_passes_through_in_inference():
    x = np.array([[0.3, -2.0]], "float32")
    np.testing.assert_array_equal(FakeQuant()(x), x)


def test_a_batch_with_non_finite_values_leaves_the_range_as_it_is():
    layer = FakeQuant(ema_decay=0.5)
    layer(np.array([[-1.0, 2.0]], "float32"), training=True)
    for bad in ([[np.nan, 0.5]], [[np.inf, 0.5]], [[-np.inf, 0.5]]):
        layer(np.array(bad, "float32"), training=True)
        assert (layer.min.numpy(), layer.max.numpy()) == (-1.0, 2.0)
    layer(np.array([[-3.0, 4.0]], "float32"), training=True)  # finite again: moving average
    assert (layer.min.numpy(), layer.max.numpy()) == (-2.0, 3.0)


def test_per_channel_ranges_skip_only_their_non_finite_channels():
    layer = FakeQuant(per_channel=True, ema_decay=0.5)
    layer(np.array([[-1.0, 2.0], [1.0, 1.0]], "float32"), training=True)
    layer(np.array([[np.nan, 4.0], [1.0, -2.0]], "float32"), training=True)
    np.testing.assert_array_equal(layer.min.numpy(), [-1.0, -1.0])  # channel 0 kept
    np.testing.assert_array_equal(layer.max.numpy(), [1.0, 3.0])


@pytest.mark.parametrize(
    "bad_first_batch",
    [np.full((2, 3), np.nan), np.zeros((0, 3)), np.zeros((2, 3)), np.array([[np.inf] * 3] * 2)],
    ids=["all_nan", "empty", "all_zero", "all_inf"],
)
def test_the_range_starts_from_the_first_batch_with_a_finite_range(bad_first_batch):
    layer = FakeQuant()
    layer(bad_first_batch.astype("float32"), training=True)
    assert not layer.has_range() and (layer.min.numpy(), layer.max.numpy()) == (0.0, 0.0)
    x = np.array([[0.3, -2.0, 1.7]], "float32")
    np.testing.assert_array_equal(layer(x), x)  # no range yet: inference passes through
    layer(np.array([[-1.0, 3.0, 0.5]], "float32"), training=True)
    # Set by that batch, not averaged with the empty range.
    assert (layer.min.numpy(), layer.max.numpy()) == (-1.0, 3.0)


def test_inference_uses_stored_range_and_does_not_update():
    layer = FakeQuant()
    layer(np.array([[-1.0, 1.0]], "float32"), training=True)
    y = layer(np.array([[-5.0, 0.5, 5.0]], "float32"), training=False).numpy()
    assert layer.step.numpy() == 1 and layer.max.numpy() == 1.0
    assert y[0, 0] == pytest.approx(-1.0, abs=0.01) and y[0, 2] == pytest.approx(1.0, abs=0.01)


def test_mixed_precision_input_keeps_float32_range():
    layer = FakeQuant(dtype="mixed_float16")
    y = layer(tf.constant([[-1.0, 0.25, 3.0]], tf.float16), training=True)
    assert y.dtype == tf.float16
    assert layer.min.dtype == "float32" and layer.max.numpy() == 3.0


def test_config_round_trip():
    layer = FakeQuant(
        num_bits=4, symmetric=True, narrow_range=True, ema=False, quant_delay=7, name="fq"
    )
    clone = FakeQuant.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, FakeQuant) and restored.num_bits == 4


@pytest.mark.parametrize("activation, op", [("relu", tf.nn.relu), ("relu6", tf.nn.relu6)])
def test_a_fused_activation_is_applied_before_quantizing_and_sets_the_range(activation, op):
    x = np.array([[-3.0, 0.4, 2.5, 7.0, -0.1]], "float32")
    layer = FakeQuant(activation=activation)
    trained = layer(x, training=True)
    clamped = op(x).numpy()
    assert (layer.min.numpy(), layer.max.numpy()) == (0.0, clamped.max())
    expected = tf.quantization.fake_quant_with_min_max_vars(clamped, 0.0, clamped.max())
    np.testing.assert_array_equal(trained, expected)
    np.testing.assert_array_equal(layer(x), expected)  # inference
    assert FakeQuant.from_config(layer.get_config()).activation == activation


def test_a_fused_activation_still_applies_during_the_quant_delay():
    layer = FakeQuant(activation="relu", quant_delay=5)
    x = np.array([[-1.0, 0.123]], "float32")
    np.testing.assert_array_equal(layer(x, training=True), np.maximum(x, 0.0))


def numpy_weight_range(kernel, symmetric):
    """Reference `WeightQuantizer.range`, per output channel: min / max with
    0, `[-M, M]` when symmetric; all-zero channels get the widest channel's
    `[-W, W]` (or `[-1, 1]`)."""
    flat = kernel.reshape(-1, kernel.shape[-1])
    low, high = np.minimum(flat.min(0), 0), np.maximum(flat.max(0), 0)
    if symmetric:
        high = np.maximum(-low, high)
        low = -high
    widest = np.max(np.maximum(-low, high)) or 1.0
    empty = (low == 0) & (high == 0)
    return np.where(empty, -widest, low), np.where(empty, widest, high)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("zeros", ["none", "one_channel", "all"])
def test_weight_range_is_the_range_fake_quant_uses(symmetric, zeros):
    from keras_qat import WeightQuantizer

    kernel = np.random.default_rng(7).standard_normal((3, 3, 2, 4)).astype("float32")
    kernel[..., 1] = np.abs(kernel[..., 1])  # a channel without negative weights
    if zeros != "none":
        kernel[..., 2 if zeros == "one_channel" else slice(None)] = 0.0
    quantizer = WeightQuantizer(symmetric=symmetric, per_channel=True)
    low, high = quantizer.range(tf.constant(kernel))
    expected_low, expected_high = numpy_weight_range(kernel, symmetric)
    np.testing.assert_array_equal(low, expected_low)
    np.testing.assert_array_equal(high, expected_high)


def rounded_off_kernel():
    """A kernel, one output channel per column, whose extreme weights lie
    outside TensorFlow's nudged range (per the numpy reference): a symmetric
    bound `M` with `127 * (2M / 254) < M` in float32, and an asymmetric
    column whose zero point rounds the range off by part of a step."""
    bound = next(
        m
        for m in np.linspace(0.1, 1.0, 2000, dtype="float32")
        if reference.nudge(-m, m, 8, True)[1] < m
    )
    column = np.linspace(-0.3, 1.0, 6, dtype="float32")
    assert reference.nudge(column.min(), column.max(), 8, False)[1] < column.max()
    symmetric = np.linspace(-bound / 2, bound, 6, dtype="float32")
    return np.stack([symmetric, column], axis=-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_weight_gets_its_gradient_straight_through(symmetric):
    """The range is the kernel's own min / max, so no weight is clipped; a
    zero gradient at an extreme that the nudging rounds off (TensorFlow's
    fake-quant gradient) would stop a channel's largest weight for good."""
    from keras_qat import WeightQuantizer

    kernel = tf.Variable(rounded_off_kernel())
    quantizer = WeightQuantizer(
        symmetric=symmetric, narrow_range=symmetric, per_channel=True, name="q"
    )
    quantizer.build(kernel.shape)
    upstream = np.random.default_rng(3).standard_normal(kernel.shape).astype("float32")
    with tf.GradientTape() as tape:
        values = quantizer.quantize_weights(kernel, training=True).values
        loss = tf.reduce_sum(values * upstream)
    np.testing.assert_array_equal(tape.gradient(loss, kernel), upstream)
