"""The Keras model rounds where TFLite's int8 kernels round, as they round:
a float model input (QUANTIZE, XNNPACK) and a layer norm's inverse square
root (RSQRT, TFLite's fixed-point kernel), each against the TFLite
interpreter on values placed at or near the kernels' ties."""

import keras
import numpy as np
import tensorflow as tf
from test_export import calibrate

import keras_qat as kq
from keras_qat.requantization import from_float
from keras_qat.tflite_rsqrt import INVERSE_SQRT_TABLE, rounded_rsqrt


def test_a_float_input_is_quantized_as_tflites_quantize_op():
    inputs = keras.Input((1024,))
    qat = kq.convert_quant_network(keras.Model(inputs, keras.layers.Reshape((32, 32))(inputs)))
    rng = np.random.default_rng(0)
    calibrate(qat, (rng.standard_normal((64, 1024)) * 2).astype("float32"), steps=1)
    tflite_bytes = kq.export_tflite(qat)
    _, scale = kq.run_tflite(tflite_bytes, np.zeros((1, 1024), "float32"))
    # Values within a few float32 steps of a tie of the stored grid: 23 % of
    # them were a step apart when the Keras model rounded them as
    # TensorFlow's fake-quant kernel does.
    ties = (rng.integers(-100, 100, (64, 1024)) + 0.5) * np.float32(scale)
    x = (ties + rng.integers(-3, 4, ties.shape) * np.spacing(ties.astype("float32"))).astype(
        "float32"
    )
    tflite_out, _ = kq.run_tflite(tflite_bytes, x)
    np.testing.assert_array_equal(np.asarray(qat.predict(x, verbose=0)), tflite_out)


def test_from_float_rounds_the_product_with_the_reciprocal_to_even():
    rng = np.random.default_rng(1)
    scale = np.float32(0.06182004)
    x = (rng.standard_normal(10_000) * 4).astype("float32")
    expected = np.round(x * (np.float32(1) / scale)) * scale  # np.round: ties to even
    np.testing.assert_array_equal(from_float(x, scale).numpy(), expected.astype("float32"))
    assert float(from_float(0.625, 0.25)) == 0.5  # 2.5 steps: to even
    np.testing.assert_array_equal(from_float(x, 0.0).numpy(), x)  # no grid yet
    infinite = np.array([np.inf, -np.inf], "float32")  # left for the FakeQuant to clamp
    np.testing.assert_array_equal(from_float(infinite, scale).numpy(), infinite)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = from_float(x, scale)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.ones(x.shape))


def tflite_rsqrt_levels(input_max, output_max):
    """TFLite's int8 RSQRT on every input level of a grid `[0, input_max]`
    (built from TensorFlow's fake-quant ops, converted alone): the output
    levels above zero, and the two stored scales."""

    @tf.function(input_signature=[tf.TensorSpec([1, 256], tf.float32)])
    def rsqrt(x):
        x = tf.quantization.fake_quant_with_min_max_args(x, 0.0, input_max)
        return tf.quantization.fake_quant_with_min_max_args(tf.math.rsqrt(x), 0.0, output_max)

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [rsqrt.get_concrete_function()], rsqrt
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    source, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert [op["op_name"] for op in interpreter._get_ops_details()] == ["RSQRT"]
    assert source["quantization"][1] == result["quantization"][1] == -128
    interpreter.set_tensor(source["index"], np.arange(-128, 128, dtype=np.int8)[None])
    interpreter.invoke()
    levels = interpreter.get_tensor(result["index"])[0].astype(int) + 128
    return levels, np.float32(source["quantization"][0]), np.float32(result["quantization"][0])


def test_rounded_rsqrt_computes_what_tflites_int8_rsqrt_kernel_computes():
    rng = np.random.default_rng(0)
    # A small ViT's layer norm (first), where the float computation puts
    # input level 36 at 42.4999992 steps and the kernel at 43; then random
    # grids.
    grids = [(0.006619133520871401 * 255, 0.04820135608315468 * 255)]
    grids += [(rng.uniform(0.05, 20), rng.uniform(0.5, 30)) for _ in range(12)]
    float_differs = 0
    for input_max, output_max in grids:
        expected, input_scale, output_scale = tflite_rsqrt_levels(input_max, output_max)
        values = np.arange(1, 256, dtype=np.float32) * input_scale
        ours = rounded_rsqrt(tf.math.rsqrt(values), values, input_scale, output_scale)
        ours = np.clip(np.round(np.asarray(ours) / output_scale), 0, 255)
        np.testing.assert_array_equal(ours, expected[1:], err_msg=f"{(input_max, output_max)}")
        exact = np.clip(np.round(1 / np.sqrt(values.astype(np.float64)) / output_scale), 0, 255)
        float_differs += int(np.sum(exact != expected[1:]))
    assert float_differs >= 1  # the first grid's level 36, at least


def test_rounded_rsqrt_passes_gradients_and_leaves_what_it_does_not_round():
    table = 2**20 / np.sqrt(np.arange(1, 256))
    assert np.abs(INVERSE_SQRT_TABLE[1:] - table).max() <= 1.5  # the kernel's integers
    values = tf.constant([0.0, 0.5, 3.0])  # levels 0 (infinite), 1 and 6 of 0.5
    with tf.GradientTape() as tape:
        tape.watch(values)
        inverse_root = tf.math.rsqrt(values)
        y = rounded_rsqrt(inverse_root, values, 0.5, 0.01)
        finite = tf.reduce_sum(y[1:])
    assert np.isinf(y[0]) and np.all(np.isfinite(y[1:]))
    np.testing.assert_allclose(y[1:] / 0.01, np.round(1 / np.sqrt([0.5, 3.0]) / 0.01))
    np.testing.assert_allclose(
        tape.gradient(finite, values)[1:], -0.5 * np.array([0.5, 3.0]) ** -1.5, rtol=1e-6
    )
    np.testing.assert_array_equal(rounded_rsqrt(inverse_root, values, 0.0, 0.01), inverse_root)
