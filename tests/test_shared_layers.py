"""A layer called more than once in a model (several inputs, one set of
weights): its delays count training steps, not calls; its folded
BatchNorm freezes with the rest; each call's bias is rounded on the grid
of that call's input."""

import keras
import numpy as np

import keras_qat as kq

L = keras.layers
EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])


def test_a_shared_layer_counts_one_step_per_training_step():
    rng = np.random.default_rng(0)
    a, b = keras.Input((4,)), keras.Input((4,))
    shared = L.Dense(3, name="shared")
    single = L.Dense(3, name="single")
    model = keras.Model([a, b], [shared(a), shared(b), single(a)])
    qat = kq.convert_quant_network(model, quant_delay=3, **EXPORTABLE)
    assert qat.get_layer("shared").weight_quantizer.calls_per_step == 2
    x = [rng.uniform(-1, 1, (8, 4)).astype("float32") for _ in range(2)]
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss=["mse"] * 3)
    y = [np.zeros((8, 3), "float32")] * 3
    for step in range(5):
        qat.train_on_batch(x, y)
        for name in ("shared", "single"):
            assert int(qat.get_layer(name).weight_quantizer.steps()) == step + 1, (name, step)
    assert int(qat.get_layer("shared").weight_quantizer.step.numpy()) == 10  # calls


def test_a_shared_folded_layer_freezes_with_the_rest():
    rng = np.random.default_rng(0)
    a, b = keras.Input((6, 6, 2)), keras.Input((6, 6, 2))
    conv = kq.Conv2DBnAct(3, 3, has_bn=True, name="conv")
    model = keras.Model([a, b], [conv(a), conv(b)])
    qat = kq.convert_quant_network(model, freeze_bn=2, **EXPORTABLE)
    x = [rng.uniform(-1, 1, (8, 6, 6, 2)).astype("float32") for _ in range(2)]
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss=["mse"] * 2)
    y = [np.zeros((8, 4, 4, 3), "float32")] * 2
    moving_mean = qat.get_layer("conv").bn.moving_mean
    qat.train_on_batch(x, y)
    after_one = moving_mean.numpy().copy()
    qat.train_on_batch([v * 2 for v in x], y)  # step 1: still before freeze_bn
    assert not np.array_equal(moving_mean.numpy(), after_one)
    frozen = moving_mean.numpy().copy()
    qat.train_on_batch([v * 3 for v in x], y)  # step 2: frozen
    np.testing.assert_array_equal(moving_mean.numpy(), frozen)


def test_a_shared_layer_rounds_its_bias_with_each_calls_input_grid():
    rng = np.random.default_rng(0)
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    shared = L.Dense(3, name="shared", bias_initializer=keras.initializers.Constant(0.123456))
    qat = kq.convert_quant_network(keras.Model([a, b], [shared(a), shared(b)]), **EXPORTABLE)
    x = [rng.uniform(-1, 1, (16, 4)).astype("float32"), rng.uniform(-5, 5, (16, 4)).astype("f4")]
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    qat.train_on_batch(x, [np.zeros((16, 3), "float32")] * 2)
    kq.check_exportable(qat)  # both calls know their input grid
    tflite_bytes = kq.export_tflite(qat)
    for report in kq.compare_tflite(qat, tflite_bytes, x):
        assert report["within_one_step"] == 1.0, report


def fully_connected_weights(tflite_bytes):
    """(int8 weights, scales) of each FULLY_CONNECTED op of a TFLite model."""
    from keras_qat.export.interpreter import tflite_interpreter, tflite_ops

    interpreter = tflite_interpreter(tflite_bytes)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    weights = []
    for op in tflite_ops(interpreter):
        if op["op_name"] == "FULLY_CONNECTED":
            tensor = tensors[op["inputs"][1]]
            scales = tensor["quantization_parameters"]["scales"]
            weights.append((interpreter.get_tensor(tensor["index"]), scales))
    return weights


def test_a_shared_layer_and_equal_kernels_export_their_trained_levels():
    rng = np.random.default_rng(0)
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    shared, twin_a, twin_b = L.Dense(6, name="shared"), L.Dense(6, name="ta"), L.Dense(6, name="tb")
    x = L.Concatenate()([shared(a), shared(b), twin_a(a), twin_b(b)])
    model = keras.Model([a, b], L.Dense(4, name="head")(x))
    twin_a.set_weights(twin_b.get_weights())  # equal constants, which the converter merges
    qat = kq.convert_quant_network(model)  # per-tensor dense weights
    data = [rng.normal(size=(256, 8)).astype("f4"), 2 * rng.normal(size=(256, 8)).astype("f4")]
    qat(data, training=True)
    tflite_bytes = kq.export_tflite(qat)
    kernels = {"shared", "ta", "tb"}
    for levels, scales in fully_connected_weights(tflite_bytes):
        assert len(scales) == 1  # per tensor, as trained
        if levels.shape == (6, 8):  # one of the repeated kernels: the trained levels
            name = next(n for n in kernels if np.array_equal(levels, _levels(qat, n)))
            quantizer = qat.get_layer(name).weight_quantizer
            step = quantizer.grid_scale(*quantizer.range(qat.get_layer(name).quantized_kernel()))
            np.testing.assert_allclose(scales[0], float(step), rtol=1e-5)
    report = kq.compare_tflite(qat, tflite_bytes, data)
    assert report["max_diff_steps"] <= 1.001 and report["within_one_step"] == 1.0


def _levels(qat, name):
    layer = qat.get_layer(name)
    kernel = layer.quantized_kernel()
    quantizer = layer.weight_quantizer
    step = quantizer.grid_scale(*quantizer.range(kernel))
    return np.round(np.asarray(kernel) / np.asarray(step)).astype(np.int8).T
