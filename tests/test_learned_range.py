"""Learned ranges (LSQ): the fake quant and its gradients against a numpy
implementation of the paper's formulas, the step that stays positive, and
models that train, save, resume, distribute, compile with XLA and export
with the learned step as their scale."""

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf
from test_export import assert_integer_model

import keras_qat as kq
from conftest import mirrored_strategy
from keras_qat import quantizer_roles
from keras_qat.layers.learned_range import MAX_STEP, MIN_STEP, learned_step_fake_quant


def lsq_reference(x, step, zero_point, qmin, qmax, grad_scale, dy):
    """Esser et al. 2019: y = round(clip(x / s, qn, qp)) * s; dy/dx = 1
    inside [qn, qp]; dy/ds = round(v) - v inside, qn below, qp above; the
    step's gradient times `grad_scale`. Per channel: `step` along the last
    axis. Rounding half up, as TensorFlow's fake quant rounds."""
    x, step, dy = (np.asarray(a, np.float64) for a in (x, step, dy))
    lowest, highest = qmin - zero_point, qmax - zero_point
    v = x / step
    inside = (v >= lowest) & (v <= highest)
    y = np.floor(np.clip(v, lowest, highest) + 0.5) * step
    dx = np.where(inside, dy, 0.0)
    term = np.where(inside, np.floor(v + 0.5) - v, np.where(v < lowest, lowest, highest))
    axes = tuple(range(x.ndim - 1)) if step.ndim == 1 else None
    return y, dx, grad_scale * np.sum(dy * term, axis=axes)


def run_lsq(x, step, zero_point, num_bits, narrow_range, grad_scale, dy):
    x, step = tf.constant(x), tf.Variable(step)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = learned_step_fake_quant(x, step, zero_point, num_bits, narrow_range, grad_scale)
        loss = tf.reduce_sum(y * dy)
    dx, d_step = tape.gradient(loss, [x, step])
    return y.numpy(), dx.numpy(), d_step.numpy()


@pytest.mark.parametrize(
    "num_bits, narrow_range, zero_point", [(4, True, 8), (8, False, 100), (3, False, 0)]
)
def test_lsq_forward_and_gradients_match_the_papers_formulas(num_bits, narrow_range, zero_point):
    rng = np.random.default_rng(0)
    step = 0.25  # a power of two: the grid's bounds are exact in float32
    qmin, qmax = (1 if narrow_range else 0), 2**num_bits - 1
    x = rng.uniform((qmin - zero_point - 3) * step, (qmax - zero_point + 3) * step, (64, 5))
    x[0, :2] = [(qmin - zero_point) * step, (qmax - zero_point) * step]  # on the clipping bounds
    x = x.astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    got = run_lsq(x, np.float32(step), zero_point, num_bits, narrow_range, 0.1, dy)
    expected = lsq_reference(x, step, zero_point, qmin, qmax, 0.1, dy)
    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert np.any(x < (qmin - zero_point) * step) and np.any(x > (qmax - zero_point) * step)


def test_lsq_per_channel_steps_get_their_own_gradients():
    rng = np.random.default_rng(1)
    step = np.array([0.125, 0.5, 0.25], "float32")
    x = rng.uniform(-10, 10, (4, 4, 3)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    got = run_lsq(x, step, 8, 4, True, 0.5, dy)
    expected = lsq_reference(x, step, 8, 1, 15, 0.5, dy)
    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert got[2].shape == (3,)


def test_learned_quantizers_start_from_the_first_batch_and_use_lsqs_gradient_scale():
    x = tf.constant(np.linspace(-1.0, 2.0, 16, dtype="float32").reshape(2, 8))
    fq = kq.LearnedFakeQuant(num_bits=8)
    y = fq(x, training=True)
    step = float(fq.scale.numpy())
    assert step == pytest.approx(3.0 / 255) and float(fq.zero_point.numpy()) == 85.0
    np.testing.assert_allclose(fq(x).numpy(), y.numpy())  # inference: the same grid
    wider = x * 1.5  # the next batch: some values clip, the step's gradient grows
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fq(wider, training=True) * wider)
    # The variable is the step's logarithm; its gradient is LSQ's step
    # gradient (g = 1 / sqrt(numel * qp), qp = 255 - 85) divided by the
    # step, so that SGD moves the step by LSQ's update, to first order.
    d_log_step = float(tape.gradient(loss, fq.log_scale).numpy())
    expected = lsq_reference(wider.numpy(), step, 85, 0, 255, 1 / np.sqrt(16 * 170), wider.numpy())
    assert d_log_step == pytest.approx(float(expected[2]) / step, rel=1e-3)
    assert abs(expected[2]) > 0.1
    quantizer = kq.LearnedWeightQuantizer(num_bits=4, symmetric=True, narrow_range=True)
    kernel = tf.constant([[0.7, -0.35], [0.1, 0.2]])
    quantizer.build(kernel.shape)
    untrained = quantizer.quantize_weights(kernel).values  # the kernel's own range first
    np.testing.assert_allclose(untrained, kq.fake_quant(kernel, -0.7, 0.7, 4, True, True))
    quantizer.quantize_weights(kernel, training=True)
    # 0.95 * 0.7 / 7: -0.35 and 0.2 round closer than on the full range's grid.
    assert float(quantizer.step_for(kernel).numpy()) == pytest.approx(0.095)
    with pytest.raises(ValueError, match="Received: symmetric=False"):
        kq.LearnedWeightQuantizer(symmetric=False)


FRACTIONS = np.arange(15) * 0.05 + 0.3  # 0.3 .. 1.0


def least_error(candidates, error):
    """The candidate of least `error` (the first of equals, as argmin)."""
    return candidates[int(np.argmin([error(c) for c in candidates]))]


def weight_error(values, step):
    """Squared error of `values` on the signed 4-bit grid of `step`."""
    return np.sum((np.clip(np.round(values / step), -7, 7) * step - values) ** 2)


def test_a_learned_step_starts_where_its_grid_rounds_the_data_with_the_least_error():
    """At 4 bits an outlier stretches the full range's grid over values it
    then rounds coarsely: the start is the fraction of the range with the
    least squared error (numpy, every candidate), per channel for weights."""
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(0, 1, (64, 10))).astype("float32")
    x[0, 0] = 12.0  # an outlier
    fq = kq.LearnedFakeQuant(num_bits=4)
    fq(tf.constant(x), training=True)
    start = least_error(
        FRACTIONS, lambda f: np.sum((reference.fake_quant(x, 0, f * 12.0, 4) - x) ** 2)
    )
    assert start < 1.0  # the outlier is clipped
    assert float(fq.max.numpy()) == pytest.approx(start * 12.0, rel=1e-5)
    kernel = rng.normal(0, 0.1, (3, 3, 4, 5)).astype("float32")
    kernel[0, 0, 0, 2] = 1.0  # one channel with an outlier
    quantizer = kq.LearnedWeightQuantizer(
        num_bits=4, symmetric=True, narrow_range=True, per_channel=True
    )
    quantizer.build(kernel.shape)
    quantizer.quantize_weights(tf.constant(kernel), training=True)
    for channel in range(5):
        values = kernel[..., channel]
        full = np.abs(values).max() / 7
        steps = FRACTIONS * full
        step = least_error(steps, lambda s, v=values: weight_error(v, s))
        learned = quantizer.step_for(kernel).numpy()[channel]
        assert float(learned) == pytest.approx(step, rel=1e-5), channel
    assert float(quantizer.step_for(kernel).numpy()[2]) < 1.0 / 7  # the outlier is clipped


def test_a_learned_weight_step_follows_the_kernels_scale():
    """A folded BatchNorm whose moving variance is still settling rescales
    the folded kernel at every step: the learned factor keeps its levels
    (a fixed step, as before `relative_step`, clipped a kernel grown 3x to
    its grid's ends, and learned ranges lost to min / max ranges by 2-9
    points in a one-epoch fine-tune of a briefly trained network)."""
    rng = np.random.default_rng(1)
    kernel = tf.constant(rng.normal(0, 0.1, (3, 3, 2, 4)).astype("float32"))
    quantizer = kq.LearnedWeightQuantizer(
        num_bits=4, symmetric=True, narrow_range=True, per_channel=True
    )
    quantizer.build(kernel.shape)
    first = quantizer.quantize_weights(kernel, training=True)
    grown = quantizer.quantize_weights(3.0 * kernel, training=True)
    np.testing.assert_allclose(grown.values, 3.0 * first.values.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grown.scale, 3.0 * first.scale.numpy(), rtol=1e-6)
    with pytest.raises(AttributeError, match="step_for"):
        quantizer.scale  # noqa: B018  depends on the kernel
    # The factor's gradient is LSQ's step gradient divided by the step (a
    # factor of 0.8: no weight on the grid's ends, where float rounding
    # decides inside or outside).
    quantizer.log_scale.assign(np.log(np.full(4, 0.8, "float32")))
    dy = tf.constant(rng.normal(0, 1, kernel.shape).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(quantizer.quantize_weights(kernel, training=True).values * dy)
    step = quantizer.step_for(kernel).numpy()
    grad_scale = 1 / np.sqrt(18 * 7)
    _, _, d_step = lsq_reference(kernel.numpy(), step, 0, -7, 7, grad_scale, dy.numpy())
    np.testing.assert_allclose(
        tape.gradient(loss, quantizer.log_scale), d_step / step, rtol=1e-4, atol=1e-6
    )
    # Saved before relative_step: log_scale is the step's own logarithm.
    config = quantizer.get_config()
    assert kq.LearnedWeightQuantizer.from_config(config).relative_step is True
    del config["relative_step"]
    old = kq.LearnedWeightQuantizer.from_config(config)
    old.build(kernel.shape)
    assert old.relative_step is False and len(old.weights) == len(quantizer.weights)
    old.log_scale.assign(np.log(np.full(4, 0.02, "float32")))
    old.initialized.assign(1.0)
    np.testing.assert_allclose(old.step_for(3.0 * kernel), 0.02, rtol=1e-6)


def test_the_step_rate_moves_the_log_step_that_many_times_faster_and_is_saved():
    x = tf.constant(np.linspace(-1.0, 2.0, 16, dtype="float32").reshape(2, 8))
    moves = {}
    for rate in (1.0, 3.0):
        fq = kq.LearnedFakeQuant(num_bits=4, step_rate=rate)
        fq(x, training=True)  # the step of the first batch, whatever the rate
        start = float(fq.scale.numpy())
        assert start == pytest.approx(3.0 / 15)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(fq(x * 1.5, training=True) * x)
        keras.optimizers.Adam(1e-2).apply([tape.gradient(loss, fq.log_scale)], [fq.log_scale])
        moves[rate] = np.log(float(fq.scale.numpy()) / start)
    assert abs(moves[1.0]) == pytest.approx(1e-2, rel=1e-2)  # Adam's first update: the rate
    assert moves[3.0] == pytest.approx(3 * moves[1.0], rel=1e-3)
    config = kq.LearnedFakeQuant(num_bits=4, step_rate=3).get_config()
    assert kq.LearnedFakeQuant.from_config(config).step_rate == 3.0
    del config["step_rate"]  # a file saved before step_rate: log_scale is the plain logarithm
    assert kq.LearnedFakeQuant.from_config(config).step_rate == 1.0
    weights = kq.LearnedWeightQuantizer(symmetric=True, step_rate=2)
    assert kq.LearnedWeightQuantizer.from_config(weights.get_config()).step_rate == 2.0
    for bad in (0, -1.0, True, "3"):
        with pytest.raises(ValueError, match=f"Received: step_rate={bad!r}"):
            kq.LearnedFakeQuant(step_rate=bad)


def small_cnn(batch_norm=True):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(4, 3)(x)
    if batch_norm:  # per replica under MirroredStrategy, unless synchronized
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def learned_network(optimizer=None, jit_compile="auto", batch_norm=True, **options):
    keras.utils.set_random_seed(0)
    qat_model = kq.convert_quant_network(small_cnn(batch_norm), range_learning=True, **options)
    qat_model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return qat_model


def test_conversion_places_learned_quantizers_and_refuses_bad_values():
    qat_model = learned_network()
    kinds = {type(layer).__name__ for layer in qat_model.layers}
    assert "LearnedFakeQuant" in kinds and "FakeQuant" not in kinds
    for layer in qat_model.layers:
        if hasattr(layer, "weight_quantizer"):
            assert type(layer.weight_quantizer).__name__ == "LearnedWeightQuantizer"
    half = kq.convert_quant_network(small_cnn(), range_learning=(True, False))
    assert "LearnedFakeQuant" not in {type(layer).__name__ for layer in half.layers}
    with pytest.raises(ValueError, match=r"Received: range_learning\[1\] \(activations\)='yes'"):
        kq.convert_quant_network(small_cnn(), range_learning=(True, "yes"))


def steps_of(qat_model):
    """The learned steps, in graph order (weights': for their kernel now)."""
    steps = []
    for layer, role, quantizer in quantizer_roles.model_quantizers(qat_model):
        if isinstance(quantizer, kq.LearnedWeightQuantizer):
            steps.append(quantizer.step_for(layer.quantized_weights()[role]).numpy())
        elif hasattr(quantizer, "log_scale"):
            steps.append(quantizer.scale.numpy())
    return steps


def test_learned_ranges_train_save_and_resume_exactly(tmp_path):
    x, y = data()
    qat_model = learned_network()
    qat_model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    before = steps_of(qat_model)
    path = str(tmp_path / "learned.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))
    for model in (qat_model, loaded):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    after, resumed = steps_of(qat_model), steps_of(loaded)
    assert len(after) == 8  # 3 kernels, 5 activation grids
    assert any(not np.allclose(b, a) for b, a in zip(before, after))  # the steps learn
    for ours, theirs in zip(resumed, after):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_a_step_never_reaches_zero_with_a_huge_learning_rate():
    x, y = data()
    qat_model = learned_network()
    qat_model.compile(
        optimizer=keras.optimizers.SGD(1e6),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    qat_model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    steps = np.concatenate([np.ravel(v) for v in steps_of(qat_model)])
    assert np.all(steps >= MIN_STEP * 0.999) and np.all(steps <= MAX_STEP * 1.001), steps
    assert np.any(np.isclose(steps, MIN_STEP, rtol=1e-3) | np.isclose(steps, MAX_STEP, rtol=1e-3))


def test_learned_ranges_train_under_xla_and_mirrored_strategy():
    """Same steps as on one device without XLA (SGD: Adam's normalization
    would magnify float-order differences of near-zero gradients; no
    BatchNorm, whose batch statistics are per replica). Without the global
    element count in the gradient scale, steps were 3.6 % apart."""
    x, y = data()

    def trained(**options):
        qat_model = learned_network(keras.optimizers.SGD(0.05), batch_norm=False, **options)
        qat_model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
        return steps_of(qat_model)

    expected = trained()
    compiled = trained(jit_compile=True)
    with mirrored_strategy().scope():
        mirrored = trained()
    for steps in (compiled, mirrored):
        for value, reference_value in zip(steps, expected):
            np.testing.assert_allclose(value, reference_value, rtol=1e-3)


def test_the_learned_steps_are_the_exported_scales():
    x, y = data(128)
    qat_model = learned_network()
    qat_model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    tflite_bytes = kq.export_tflite(qat_model)
    assert_integer_model(tflite_bytes, ["CONV_2D"], ["CONV_2D"])
    interpreter = kq.tflite_interpreter(tflite_bytes, default_delegates=False)
    scales = [
        t["quantization_parameters"]["scales"]
        for t in interpreter.get_tensor_details()
        if len(t["quantization_parameters"]["scales"])
    ]
    learned = [np.ravel(v) for v in steps_of(qat_model)]
    for step in learned:  # each learned step (vector) is some tensor's scales
        assert any(s.shape == step.shape and np.allclose(s, step, rtol=1e-6) for s in scales), step
    tflite_out, scale = kq.run_tflite(tflite_bytes, x)
    steps = np.abs(qat_model.predict(x, verbose=0) - tflite_out) / scale
    assert np.mean(steps < 0.5) >= 0.99 and steps.max() <= 1.001
