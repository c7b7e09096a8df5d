import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qat as kq
from keras_qat.export.agreement import agreement
from keras_qat.export.interpreter import TensorProbe, float_ops, tflite_interpreter
from keras_qat.export.saved_model import save_for_conversion
from keras_qat.layers.call_context import tracing_for_export

EXPORTABLE = dict(symmetric=[True, False], narrow_range=[True, False])


def calibrate(qat_model, x, steps=4, seed=0):
    """A few training steps: ranges learn, weights move a little. `x` is a
    batch or a list of batches (one per input); every output is trained."""
    rng = np.random.default_rng(seed)
    n = len(x[0] if isinstance(x, list) else x)
    y = [
        rng.standard_normal((n,) + tuple(t.shape[1:])).astype("float32") for t in qat_model.outputs
    ]
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=["mse"] * len(y))
    for _ in range(steps):
        qat_model.train_on_batch(x, y if len(y) > 1 else y[0])
    return qat_model


def ops_and_tensors(tflite_bytes):
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return interpreter._get_ops_details(), tensors


def assert_integer_model(tflite_bytes, compute_ops, per_channel_ops=()):
    """Every compute op reads and writes int8 (int32 bias); weights symmetric."""
    ops, tensors = ops_and_tensors(tflite_bytes)
    names = [op["op_name"] for op in ops]
    for op_name in compute_ops:
        assert op_name in names, names
    assert float_ops(tflite_bytes) == []
    for op in ops:
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            data, weights = tensors[op["inputs"][0]], tensors[op["inputs"][1]]
            assert data["dtype"] == np.int8 and weights["dtype"] == np.int8
            assert tensors[op["outputs"][0]]["dtype"] == np.int8
            assert not np.any(weights["quantization_parameters"]["zero_points"])
            if len(op["inputs"]) > 2 and op["inputs"][2] >= 0:
                assert tensors[op["inputs"][2]]["dtype"] == np.int32
            n_scales = len(weights["quantization_parameters"]["scales"])
            if op["op_name"] in per_channel_ops:
                assert (
                    n_scales
                    == weights["shape"][-1 if op["op_name"] == "DEPTHWISE_CONV_2D" else 0]
                    > 1
                )
            else:
                assert n_scales == 1
        elif op["op_name"] == "CAST" and all(
            tensors[i]["dtype"] in (np.int32, np.int64, np.bool_) for i in op["outputs"]
        ):
            continue  # float token ids or 0 / 1 masks made indices or flags: no float compute
        elif op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "SHAPE", "STRIDED_SLICE", "PACK"):
            for index in list(op["inputs"]) + list(op["outputs"]):
                if index >= 0:
                    # bool: attention masks and the ops that make them.
                    assert tensors[index]["dtype"] in (np.int8, np.int32, np.bool_), (
                        op["op_name"],
                        tensors[index]["name"],
                    )
    return names


def assert_parity(qat_model, tflite_bytes, x):
    """The issue's parity: top-1 >= 99.9 %, >= 99 % within one output step.

    These models are untrained, so some rows have their two largest outputs
    within two steps; there one-step differences may decide the argmax, so
    top-1 is required on the other rows, and every disagreement must be
    such a near-tie.
    """
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["within_one_step"] >= 0.99, report
    assert report["max_diff_steps"] <= 2.001, report
    assert report["top1_agreement_unambiguous"] >= 0.999, report
    assert report["top1_agreement"] >= 1 - report["ambiguous_rows"], report
    assert report["ambiguous_rows"] < 0.5, report  # the test is not vacuous
    return report


def test_near_ties_are_rows_within_tie_steps_of_a_flip():
    # Output step 0.1; the two largest Keras outputs 2.5, 0.5 and 5 steps
    # apart; TFLite flips the first two rows.
    keras_out = np.array([[1.0, 0.75, 0.0], [1.0, 0.95, 0.0], [1.0, 0.5, 0.0]])
    tflite_out = np.array([[0.8, 0.85, 0.0], [0.95, 1.0, 0.0], [1.0, 0.5, 0.0]])
    two = agreement(keras_out, tflite_out, 0.1, tie_steps=2.0)
    assert two["top1_agreement"] == pytest.approx(1 / 3)
    assert two["ambiguous_rows"] == pytest.approx(1 / 3)
    assert two["top1_agreement_unambiguous"] == pytest.approx(1 / 2)
    three = agreement(keras_out, tflite_out, 0.1, tie_steps=3.0)
    assert three["ambiguous_rows"] == pytest.approx(2 / 3)
    assert three["top1_agreement_unambiguous"] == 1.0
    # A float output has no steps, so no near-ties.
    assert agreement(keras_out, tflite_out, None, tie_steps=2.0)["ambiguous_rows"] == 0.0
    with pytest.raises(ValueError, match="Received: tie_steps=-1"):
        kq.compare_tflite(None, b"", np.zeros((1, 3)), tie_steps=-1)


def conv_model(per_channel, has_bn=True, bn_fold=True):
    inputs = keras.Input((12, 12, 3))
    x = kq.Conv2DBnAct(8, 3, has_bn=has_bn, activation="relu")(inputs)
    x = kq.Conv2DBnAct(8, 3, strides=2, padding="same", activation="relu6")(x)
    x = keras.layers.Flatten()(x)
    outputs = kq.DenseBnAct(10)(x)
    model = keras.Model(inputs, outputs)
    return kq.convert_quant_network(
        model, per_channel=[per_channel, False], bn_fold=bn_fold, **EXPORTABLE
    )


@pytest.mark.parametrize("per_channel", [True, False])
def test_conv_and_dense_export_to_int8(per_channel):
    x = np.random.default_rng(0).uniform(-1, 1, (256, 12, 12, 3)).astype("float32")
    # Per-tensor weights cannot absorb an unfolded BatchNorm (see below).
    qat_model = calibrate(conv_model(per_channel, has_bn=per_channel, bn_fold=False), x)
    tflite_bytes = kq.export_tflite(qat_model)
    pc_ops = ("CONV_2D",) if per_channel else ()
    names = assert_integer_model(tflite_bytes, ["CONV_2D"], pc_ops)
    # A per-channel Dense is exported as a 1x1 CONV_2D, per tensor as FULLY_CONNECTED.
    assert ("FULLY_CONNECTED" in names) != per_channel
    assert_parity(qat_model, tflite_bytes, x)


def test_dense_without_bias_non_relu_activation_and_offset_input():
    inputs = keras.Input((16,))
    x = kq.DenseBnAct(32, use_bias=False, activation="sigmoid")(inputs)
    x = kq.DenseBnAct(24, activation="leaky_relu")(x)
    outputs = kq.DenseBnAct(10, use_bias=False)(x)
    qat_model = kq.convert_quant_network(keras.Model(inputs, outputs), **EXPORTABLE)
    x = np.random.default_rng(1).uniform(2.0, 5.0, (512, 16)).astype("float32")  # not centred on 0
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)
    assert_integer_model(tflite_bytes, ["FULLY_CONNECTED", "LOGISTIC", "LEAKY_RELU"])
    assert_parity(qat_model, tflite_bytes, x)


def merge_model(shared_input):
    """Add and Concatenate of inputs with different ranges.

    With `shared_input`, one Concatenate input is also used by the Add, so
    TFLite must requantize it (a QUANTIZE op) onto the concatenation's scale.
    """
    inputs = keras.Input((8, 8, 4))
    a = kq.Conv2DBnAct(6, 3, padding="same", activation="relu")(inputs)
    b = kq.Conv2DBnAct(6, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(inputs)
    added = keras.layers.Add()([a, b])  # a and b have different ranges
    other = a if shared_input else kq.Conv2DBnAct(6, 3, padding="same", activation="relu6")(inputs)
    merged = keras.layers.Concatenate()([added, other])
    pooled = keras.layers.GlobalAveragePooling2D()(merged)
    outputs = kq.DenseBnAct(10)(pooled)
    return kq.convert_quant_network(
        keras.Model(inputs, outputs), per_channel=[True, False], **EXPORTABLE
    )


def test_merges_with_different_ranges():
    qat_model = merge_model(shared_input=False)
    x = np.random.default_rng(2).standard_normal((256, 8, 8, 4)).astype("float32")
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)
    names = assert_integer_model(
        tflite_bytes, ["ADD", "CONCATENATION", "CONV_2D", "MEAN"], ("CONV_2D",)
    )
    assert "QUANTIZE" not in names[1:]  # every operand is written on the shared grid
    assert_parity(qat_model, tflite_bytes, x)


def test_requantized_concat_input_is_within_one_step():
    # TFLite's int8 QUANTIZE (requantize) op rounds twice in fixed point
    # (SaturatingRoundingDoublingHighMul on a small integer, then a rounding
    # shift), which moves values up to about 1/16 step below a tie upwards;
    # the simulated model rounds once. Those values differ by one step.
    qat_model = merge_model(shared_input=True)
    x = np.random.default_rng(2).standard_normal((256, 8, 8, 4)).astype("float32")
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)
    names = assert_integer_model(tflite_bytes, ["ADD", "CONCATENATION"], ("CONV_2D",))
    assert names.count("QUANTIZE") == 2  # the input, and `a` onto the concatenation's grid
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["within_one_step"] >= 0.97 and report["max_diff_steps"] <= 2.001, report
    assert report["top1_agreement_unambiguous"] >= 0.999, report


@pytest.mark.parametrize("pooling", ["max", "reshape"])
def test_a_pooled_tensor_read_by_a_concatenation_and_another_layer_is_requantized_for_both(
    pooling,
):
    """DenseNet's stem: a max pooling's result goes to a concatenation and to
    a BatchNormalization. TFLite's converter puts that result on the
    concatenation's grid for both (CONCATENATION's same-scale constraint
    reaches back to it), so the BatchNormalization's DEPTHWISE_CONV_2D reads
    it requantized. Before, the Keras model gave it the unrequantized
    values (exact on a few percent of them; DenseNet's stem then 0.37 steps
    off on average)."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = L.MaxPooling2D(2)(x) if pooling == "max" else L.Reshape((4, 4, 32))(x)
    normalized = L.BatchNormalization(name="norm")(x)
    merged = L.Concatenate()([x, L.Conv2D(8, 1)(L.ReLU()(normalized))])
    outputs = L.Dense(4)(L.GlobalAveragePooling2D()(merged))
    qat_model = kq.convert_quant_network(keras.Model(inputs, outputs))
    x = np.random.default_rng(2).standard_normal((64, 8, 8, 3)).astype("float32")
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)
    probe = TensorProbe(tflite_bytes).run([x])
    ops, tensors = ops_and_tensors(tflite_bytes)
    read = tensors[next(op for op in ops if op["op_name"] == "DEPTHWISE_CONV_2D")["inputs"][0]]
    scale, zero_point = read["quantization"]
    in_tflite = probe.real_value(read["index"], scale, zero_point)
    norm_input = keras.tree.flatten(qat_model.get_layer("norm")._inbound_nodes[0].arguments.args)[0]
    in_keras = keras.Model(qat_model.inputs, norm_input).predict(x, verbose=0)
    steps = np.abs(in_keras - in_tflite) / scale
    # The probe runs TFLite's built-in kernels, whose QUANTIZE (int8 to
    # int8) rounds in fixed point, neither as a float rounding nor as
    # XNNPACK, which the Keras model follows (here 76-90 % exact; 75-88 %
    # with a float rounding; 9-51 % before the pooled result was put on the
    # concatenation's grid).
    exact = np.mean(steps < 0.01)
    assert exact >= 0.7 and steps.max() <= 1.001, (exact, steps.max())
    # The output, with XNNPACK (which requantizes with an 8-bit multiplier,
    # as the Keras model now does): mean 0.004 steps (0.2-0.59 before).
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["max_diff_steps"] <= 1.001, report
    assert report["mean_abs_diff"] <= 0.05 * report["output_scale"], report


@pytest.mark.parametrize("seed", [0, 4])
def test_a_product_of_two_tensors_rounds_as_xnnpacks_mul(seed):
    """Every pair of levels of two grids multiplied (MUL): the int8 model
    equals the Keras model on all 65,536 products. XNNPACK multiplies the
    levels and scales the product by the float32 `(scale_a * scale_b) /
    output_scale` (the converter's scales), ties to even; as a float
    rounding of the product, 2 and 5 of them were a step off."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((256,)), keras.Input((256,))
    qat_model = kq.convert_quant_network(keras.Model([a, b], keras.layers.Multiply()([a, b])))
    low_a, high_a, low_b, high_b = (rng.uniform(*bounds) for bounds in [(-3, -0.1), (0.1, 3)] * 2)
    batches = [
        rng.uniform(low, high, (64, 256)) for low, high in ((low_a, high_a), (low_b, high_b))
    ]
    calibrate(qat_model, [batch.astype("float32") for batch in batches], steps=1)
    grid_a = np.linspace(low_a, high_a, 256, dtype="float32")  # about one value per level
    grid_b = np.linspace(low_b, high_b, 256, dtype="float32")
    x = [np.repeat(grid_a[:, None], 256, 1), np.repeat(grid_b[None, :], 256, 0)]
    tflite_bytes = kq.export_tflite(qat_model)
    assert_integer_model(tflite_bytes, ["MUL"])
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["max_abs_diff"] <= 1e-3 * report["output_scale"], report


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tensor_with_its_own_grid_is_requantized_onto_a_concatenations_as_xnnpack_does(seed):
    """`x` has a grid of its own (a Dense reads it too), so TFLite moves it
    onto the concatenation's grid with an int8 QUANTIZE, which XNNPACK
    computes with the ratio of the scales rounded to 8 fractional bits
    (`keras_qat.requantization`). As a float rounding, 3-27 % of the
    concatenation's values were a step off XNNPACK's."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((64,))
    x = L.Dense(64, name="own_grid")(inputs)
    wide = L.Dense(64, kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))(inputs)
    joined = L.Concatenate(name="joined")([x, wide])
    model = keras.Model(inputs, [joined, L.Dense(4, name="reader")(x)])
    x_data = np.random.default_rng(seed).standard_normal((256, 64)).astype("float32")
    qat_model = calibrate(kq.convert_quant_network(model), x_data)
    tflite_bytes = kq.export_tflite(qat_model)
    ops, tensors = ops_and_tensors(tflite_bytes)
    assert any(
        op["op_name"] == "QUANTIZE" and tensors[op["inputs"][0]]["dtype"] == np.int8 for op in ops
    )
    joined_result = kq.compare_tflite(qat_model, tflite_bytes, x_data)[0]
    assert joined_result["max_diff_steps"] < 1e-3, joined_result


@pytest.mark.parametrize("io_type", [tf.int8, tf.uint8])
def test_integer_input_and_output(io_type):
    x = np.random.default_rng(3).uniform(-1, 1, (128, 12, 12, 3)).astype("float32")
    qat_model = calibrate(conv_model(True), x)
    tflite_bytes = kq.export_tflite(qat_model, input_type=io_type, output_type=io_type)
    interpreter = tflite_interpreter(tflite_bytes)
    assert interpreter.get_input_details()[0]["dtype"] == io_type.as_numpy_dtype
    assert interpreter.get_output_details()[0]["dtype"] == io_type.as_numpy_dtype
    assert_parity(qat_model, tflite_bytes, x)


@pytest.mark.parametrize("bits, pack_int4", [(4, True), (4, False), (2, True), (2, False)])
def test_low_bit_weights_stay_on_their_grid(bits, pack_int4):
    x = np.random.default_rng(4).uniform(-1, 1, (128, 12, 12, 3)).astype("float32")
    inputs = keras.Input((12, 12, 3))
    h = kq.Conv2DBnAct(8, 3, activation="relu")(inputs)
    outputs = kq.DenseBnAct(10)(keras.layers.Flatten()(h))
    qat_model = kq.convert_quant_network(
        keras.Model(inputs, outputs), num_bits=(bits, 8), per_channel=[True, False], **EXPORTABLE
    )
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model, pack_int4=pack_int4)
    # The stored levels, times their scales, are the Keras model's
    # fake-quantized weights: symmetric narrow b-bit levels, |level| <= 2**(b-1) - 1.
    ops, tensors = ops_and_tensors(tflite_bytes)
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    stored = []
    for op in ops:
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            levels = interpreter.get_tensor(op["inputs"][1])
            scales = tensors[op["inputs"][1]]["quantization_parameters"]["scales"]
            assert np.all(np.abs(levels) <= 2 ** (bits - 1) - 1), np.unique(levels)
            stored.append(levels * scales.reshape(-1, *([1] * (levels.ndim - 1))))
    conv, dense = (layer for layer in qat_model.layers if getattr(layer, "quantized", False))
    expected = [
        np.moveaxis(conv.weight_quantizer.quantize_weights(conv.kernel()).values.numpy(), -1, 0),
        dense.weight_quantizer.quantize_weights(dense.kernel()).values.numpy().T,
    ]
    assert len(stored) == 2
    for got, want in zip(stored, expected):
        np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-6, atol=1e-7)
    # With pack_int4 the converter packs them as INT4 (two values a byte).
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    types = [
        t.type
        for t in model.subgraphs[0].tensors
        if len(t.shape) >= 2 and t.buffer and model.buffers[t.buffer].data is not None
    ]
    storage = schema.TensorType.INT4 if pack_int4 else schema.TensorType.INT8
    assert types.count(storage) == 2, types
    assert_parity(qat_model, tflite_bytes, x)


def test_pack_int4_must_be_a_bool():
    x = np.random.default_rng(4).uniform(-1, 1, (16, 12, 12, 3)).astype("float32")
    with pytest.raises(ValueError, match="Received: pack_int4='no'"):
        kq.export_tflite(calibrate(conv_model(True), x), pack_int4="no")


def test_saved_model_export_also_converts(tmp_path):
    x = np.random.default_rng(5).uniform(-1, 1, (64, 12, 12, 3)).astype("float32")
    qat_model = calibrate(conv_model(False, has_bn=False), x)
    path = str(tmp_path / "saved")
    qat_model.export(path, verbose=False)  # the plain SavedModel, with its quant-delay conditions
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x), qat_model.predict(x, verbose=0), atol=1e-6)
    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    assert len(converter.convert()) > 0


def two_input_two_output_model():
    first, second = keras.Input((6,), name="first"), keras.Input((4,), name="second")
    joined = keras.layers.Concatenate()([kq.DenseBnAct(5)(first), kq.DenseBnAct(5)(second)])
    outputs = [kq.DenseBnAct(3)(joined), kq.DenseBnAct(2, activation="relu")(joined)]
    return keras.Model([first, second], outputs)


def converted(saved_model_path):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_path)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def test_the_saved_model_for_conversion_converts_as_keras_export_does(tmp_path):
    """`save_for_conversion` (one trace, no gradient functions) gives the
    converter what `model.export` gives it: the same signature, ops,
    quantization and outputs."""
    rng = np.random.default_rng(6)
    x = [rng.normal(size=(32, 6)).astype("float32"), rng.normal(size=(32, 4)).astype("float32")]
    qat_model = calibrate(kq.convert_quant_network(two_input_two_output_model(), **EXPORTABLE), x)
    ours, keras_export = str(tmp_path / "ours"), str(tmp_path / "keras")
    with tracing_for_export():
        save_for_conversion(qat_model, ours)
        qat_model.export(keras_export, verbose=False)
    models = [tflite_interpreter(converted(path)) for path in (ours, keras_export)]
    assert models[0].get_signature_list() == models[1].get_signature_list()
    ops, quantization = [], []
    for interpreter in models:
        ops.append([op["op_name"] for op in interpreter._get_ops_details()])
        details = interpreter.get_tensor_details()
        quantization.append([(d["dtype"], d["quantization"]) for d in details])
    assert ops[0] == ops[1] and "FULLY_CONNECTED" in ops[0]
    assert quantization[0] == quantization[1]
    outputs = [
        interpreter.get_signature_runner()(first=x[0], second=x[1]) for interpreter in models
    ]
    for name in outputs[1]:
        np.testing.assert_array_equal(outputs[0][name], outputs[1][name])


def test_export_does_not_warn_about_the_gradients_it_leaves_out(caplog):
    x = np.random.default_rng(7).uniform(-1, 1, (16, 12, 12, 3)).astype("float32")
    qat_model = calibrate(conv_model(False), x)
    with caplog.at_level(logging.WARNING):
        kq.export_tflite(qat_model)
    assert not [r for r in caplog.records if "gradient" in r.getMessage()], caplog.text


def test_export_refuses_what_int8_cannot_run():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, kq.DenseBnAct(3)(inputs))
    x = np.ones((8, 4), "float32")
    uncalibrated = kq.convert_quant_network(model, **EXPORTABLE)
    with pytest.raises(ValueError, match="never seen a training batch"):
        kq.export_tflite(uncalibrated)
    asymmetric = calibrate(kq.convert_quant_network(model, symmetric=False), x)
    with pytest.raises(ValueError, match="asymmetric weights"):
        kq.export_tflite(asymmetric)
    delayed = calibrate(kq.convert_quant_network(model, quant_delay=100, **EXPORTABLE), x)
    with pytest.raises(ValueError, match="quant delay"):
        kq.export_tflite(delayed)
    wide = calibrate(kq.convert_quant_network(model, num_bits=(8, 16), **EXPORTABLE), x)
    with pytest.raises(ValueError, match="16 bits"):
        kq.export_tflite(wide)
    with pytest.raises(ValueError, match="per-tensor weights followed by a BatchNorm"):
        kq.export_tflite(
            calibrate(conv_model(False, bn_fold=False), np.ones((4, 12, 12, 3), "float32"))
        )
    good = calibrate(kq.convert_quant_network(model, **EXPORTABLE), x)
    with pytest.raises(ValueError, match="input_type"):
        kq.export_tflite(good, input_type=tf.int16)


def test_writes_path_and_float_baseline_is_float(tmp_path):
    x = np.random.default_rng(6).uniform(-1, 1, (32, 12, 12, 3)).astype("float32")
    qat_model = calibrate(conv_model(True), x)
    path = tmp_path / "m.tflite"
    tflite_bytes = kq.export_tflite(qat_model, str(path))
    assert path.read_bytes() == tflite_bytes
    float_bytes = kq.export_float_tflite(keras.Model(qat_model.inputs, qat_model.outputs))
    assert float_ops(float_bytes)  # the baseline computes in float


def test_strip_names_keeps_the_model_and_drops_its_strings(tmp_path):
    x = np.random.default_rng(5).uniform(-1, 1, (64, 12, 12, 3)).astype("float32")
    qat_model = calibrate(conv_model(True, has_bn=True, bn_fold=True), x)
    named = kq.export_tflite(qat_model)
    path = tmp_path / "stripped.tflite"
    stripped = kq.export_tflite(qat_model, str(path), strip_names=True)
    assert path.read_bytes() == stripped
    assert len(stripped) < len(named)
    _, tensors = ops_and_tensors(stripped)
    assert all(not t["name"] for t in tensors.values())
    assert tflite_interpreter(stripped).get_signature_list() == {}
    np.testing.assert_array_equal(kq.run_tflite(stripped, x)[0], kq.run_tflite(named, x)[0])
    assert kq.strip_tflite_names(named) == stripped
    float_model = kq.export_float_tflite(
        kq.fuse(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])), strip_names=True
    )
    assert tflite_interpreter(float_model).get_signature_list() == {}


@pytest.mark.parametrize("activation", ["swish", "hard_swish"])
def test_real_world_patterns_export_to_int8(activation, tmp_path):
    from test_fuse import image_patterns, randomize_bns

    rng = np.random.default_rng(6)
    model = randomize_bns(image_patterns(activation), rng)
    qat_model = kq.convert_quant_network(model, per_channel=[True, False], **EXPORTABLE)
    x = rng.uniform(0, 255, (256, 16, 16, 3)).astype("float32")
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="categorical_crossentropy")
    qat_model.fit(
        x, keras.utils.to_categorical(rng.integers(0, 5, 256), 5), batch_size=64, verbose=0
    )
    path = str(tmp_path / "patterns.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))
    tflite_bytes = kq.export_tflite(qat_model)
    names = assert_integer_model(
        tflite_bytes,
        ["CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "ADD", "SUB", "AVERAGE_POOL_2D", "SOFTMAX", "PAD"],
        per_channel_ops=("CONV_2D", "DEPTHWISE_CONV_2D"),
    )
    assert names.count("HARD_SWISH") == 1 + (activation == "hard_swish")
    assert ("LOGISTIC" in names) == (activation == "swish")
    # Up to the logits, within one step of every FakeQuant; the softmax
    # output (step 1/256) moves by several steps per step of its logits.
    logits = keras.Model(qat_model.inputs, qat_model.get_layer("logits_quant").output)
    report = kq.compare_tflite(logits, kq.export_tflite(logits), x)
    assert report["within_one_step"] >= 0.99 and report["max_diff_steps"] <= 2.001, report
    report = kq.compare_tflite(qat_model, tflite_bytes, x)
    assert report["top1_agreement_unambiguous"] >= 0.999, report


def test_hard_sigmoid_exports_as_two_int8_ops():
    inputs = keras.Input((8, 8, 3))
    x = kq.Conv2DBnAct(6, 3, activation="hard_sigmoid")(inputs)
    x = kq.Conv2DBnAct(6, 1)(x)
    x = keras.layers.Activation("hard_sigmoid")(x)
    outputs = kq.DenseBnAct(4)(keras.layers.Flatten()(x))
    qat_model = kq.convert_quant_network(
        keras.Model(inputs, outputs), per_channel=[True, False], **EXPORTABLE
    )
    assert sum(isinstance(layer, kq.QuantHardSigmoid) for layer in qat_model.layers) == 2
    x = np.random.default_rng(7).uniform(-4, 4, (256, 8, 8, 3)).astype("float32")
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)  # raises if the ADD / MUL stayed float
    names = assert_integer_model(
        tflite_bytes, ["CONV_2D", "ADD", "MUL"], per_channel_ops=("CONV_2D",)
    )
    assert names.count("ADD") == 2 and names.count("MUL") == 2
    assert_parity(qat_model, tflite_bytes, x)
    # Keras' hard_sigmoid, with relu6(x + 3) on the fixed [0, 6] grid.
    import reference

    layer = kq.QuantHardSigmoid()
    values = np.linspace(-5, 5, 41).astype("float32")
    relu6 = np.asarray(keras.activations.hard_sigmoid(values)) * 6
    np.testing.assert_allclose(layer(values), reference.fake_quant(relu6, 0.0, 6.0) / 6, atol=1e-6)
    assert kq.QuantHardSigmoid.from_config(layer.get_config()).get_config() == layer.get_config()


def test_swish_exports_as_logistic_and_mul_with_the_sigmoid_rounded():
    inputs = keras.Input((8, 8, 3))
    x = kq.Conv2DBnAct(6, 3, activation="swish")(inputs)
    x = kq.Conv2DBnAct(6, 1)(x)
    x = keras.layers.Activation("silu")(x)
    outputs = kq.DenseBnAct(4)(keras.layers.Flatten()(x))
    qat_model = kq.convert_quant_network(
        keras.Model(inputs, outputs), per_channel=[True, False], **EXPORTABLE
    )
    assert sum(isinstance(layer, kq.QuantSwish) for layer in qat_model.layers) == 2
    x = np.random.default_rng(8).uniform(-4, 4, (256, 8, 8, 3)).astype("float32")
    calibrate(qat_model, x)
    tflite_bytes = kq.export_tflite(qat_model)
    names = assert_integer_model(
        tflite_bytes, ["CONV_2D", "LOGISTIC", "MUL"], per_channel_ops=("CONV_2D",)
    )
    assert names.count("LOGISTIC") == 2 and names.count("MUL") == 2
    assert_parity(qat_model, tflite_bytes, x)

    # A lone swish: TFLite's LOGISTIC writes the sigmoid on its int8 grid
    # before the MUL. With the sigmoid in float, 14 % of outputs differed.
    inputs = keras.Input((64,))
    lone = kq.convert_quant_network(
        keras.Model(inputs, keras.layers.Activation("swish")(inputs)), **EXPORTABLE
    )
    x = np.random.default_rng(9).uniform(-6, 6, (1024, 64)).astype("float32")
    calibrate(lone, x, steps=1)
    tflite_out, scale = kq.run_tflite(kq.export_tflite(lone), x)
    exact = np.mean(np.abs(lone.predict(x, verbose=0) - tflite_out) < 0.5 * scale)
    assert exact >= 0.9999, exact

    import reference

    layer = kq.QuantSwish()
    values = np.linspace(-6, 6, 49).astype("float32")
    sigmoid = 1 / (1 + np.exp(-values.astype(np.float64)))
    expected = values * reference.fake_quant(sigmoid.astype("float32"), 0.0, 255 / 256)
    np.testing.assert_allclose(layer(values), expected, atol=1e-6)
    assert kq.QuantSwish.from_config(layer.get_config()).get_config() == layer.get_config()


def test_lone_hard_swish_is_within_one_step_of_tflites_kernel():
    """TFLite's int8 HARD_SWISH (XNNPACK, 16-bit fixed point) rounds 0.4 %
    of its outputs one step away from the exact value; never more."""
    inputs = keras.Input((64,))
    lone = kq.convert_quant_network(
        keras.Model(inputs, keras.layers.Activation("hard_swish")(inputs)), **EXPORTABLE
    )
    x = np.random.default_rng(10).uniform(-6, 6, (1024, 64)).astype("float32")
    calibrate(lone, x, steps=1)
    tflite_bytes = kq.export_tflite(lone)
    assert "HARD_SWISH" in assert_integer_model(tflite_bytes, ["HARD_SWISH"])
    tflite_out, scale = kq.run_tflite(tflite_bytes, x)
    steps = np.abs(lone.predict(x, verbose=0) - tflite_out) / scale
    assert np.mean(steps < 0.5) >= 0.99 and steps.max() <= 1.001, (
        np.mean(steps < 0.5),
        steps.max(),
    )


@pytest.mark.parametrize("verbose", [None, True])
def test_export_keeps_tensorflows_logging_out_unless_asked(verbose, capfd):
    import logging

    inputs = keras.Input((4,))
    qat = kq.convert_quant_network(
        keras.Model(inputs, keras.layers.Dense(3)(inputs)),
        per_channel=[True, False],
        symmetric=[True, False],
        narrow_range=[True, False],
    )
    x = np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype("float32")
    qat.compile(optimizer="sgd", loss="mse")
    qat.fit(x, np.zeros((8, 3)), verbose=0)
    logger = logging.getLogger("tensorflow")
    handler = logging.StreamHandler()  # what absl.app's INFO logging amounts to
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        capfd.readouterr()
        kq.compare_tflite(qat, kq.export_tflite(qat, verbose=verbose), x)
        printed = capfd.readouterr()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if verbose:
        assert "Assets written" in printed.err
    else:
        assert printed.out == "" and printed.err == "", printed


def _requantization_inputs(tflite_bytes, x):
    """The integer input, INT4 levels, int32 bias, scales and output of the
    model's one CONV_2D, as TFLite's built-in kernels ran it on `x`."""
    probe = TensorProbe(tflite_bytes).run([x])
    interpreter = probe.interpreter
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    (op,) = [op for op in interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
    data, weights, bias = (interpreter.get_tensor(i).astype(np.int64) for i in op["inputs"][:3])
    input_scale, input_zero = tensors[op["inputs"][0]]["quantization"]
    output_scale, output_zero = tensors[op["outputs"][0]]["quantization"]
    weight_scales = tensors[op["inputs"][1]]["quantization_parameters"]["scales"]
    output = interpreter.get_tensor(op["outputs"][0]).astype(np.int64)
    accumulator = np.einsum("nhwc,ohwc->no", data - input_zero, weights) + bias
    multiplier = input_scale * weight_scales.astype(np.float64) / output_scale
    return accumulator, multiplier, output_zero, output[:, 0, 0]


def test_int4_convolution_differs_from_exact_rounding_only_near_ties():
    # docs/known-limits.md: TFLite requantizes an integer conv's int32
    # accumulator with a fixed-point multiplier `m * 2**-s` (m in [0.5, 1)),
    # which errs by up to 2**-(s + 1) of an output step; the Keras model
    # rounds exactly. 4-bit weights make the multiplier about 18x larger
    # than 8-bit ones, so s is about 4 smaller and ties are 16x wider.
    # Every difference must be such a near tie, one step, nothing else.
    rng = np.random.default_rng(7)
    inputs = keras.Input((3, 3, 1))
    outputs = kq.Conv2DBnAct(8, 3, padding="valid")(inputs)
    qat_model = kq.convert_quant_network(
        keras.Model(inputs, outputs), num_bits=(4, 8), per_channel=[True, False], **EXPORTABLE
    )
    calibrate(qat_model, rng.uniform(0, 1, (64, 3, 3, 1)).astype("float32"))
    x = rng.uniform(0, 1, (2000, 3, 3, 1)).astype("float32")
    accumulator, multiplier, zero, output = _requantization_inputs(kq.export_tflite(qat_model), x)
    exact = accumulator * multiplier + zero
    inside = (output > -128) & (output < 127)
    differs = inside & (output != np.floor(exact + 0.5))
    shift = -np.frexp(multiplier)[1]  # multiplier = m * 2**-shift
    error_bound = 2.0 ** -(shift + 1) + 1e-9  # per channel, broadcast over rows
    distance_to_tie = np.abs(exact - np.floor(exact) - 0.5)
    assert np.all(np.where(inside, np.abs(output - exact), 0) < 0.5 + error_bound)
    assert np.all(np.where(differs, distance_to_tie, 0) <= error_bound)
    assert differs.mean() > 0.002  # it happens at 4 bits (at 8 bits: ~16x less)


# TFLite's 16x8 mode: int16 activations, int8 weights.

INT16 = dict(num_bits=(8, 16), symmetric=(True, True), narrow_range=(True, True))


def test_int16_activations_export_a_16x8_conv_with_int64_bias_and_the_trained_grids():
    inputs = keras.Input((8, 8, 3), name="image")
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))
    x = np.random.default_rng(1).uniform(-1, 1, (64, 8, 8, 3)).astype("float32")
    qat = calibrate(kq.convert_quant_network(model, **INT16), x)
    qat.get_layer("conv").linear_layer.bias.assign([0.3, -0.2, 0.1, 0.05])
    tflite_bytes = kq.export_tflite(qat, activations="int16")
    ops, tensors = ops_and_tensors(tflite_bytes)
    (conv,) = [op for op in ops if op["op_name"] == "CONV_2D"]
    data, weights, bias = (tensors[i] for i in conv["inputs"])
    output = tensors[conv["outputs"][0]]
    assert (data["dtype"], weights["dtype"], bias["dtype"], output["dtype"]) == (
        np.int16,
        np.int8,
        np.int64,
        np.int16,
    )
    # The scales are the trained grids: a symmetric 16-bit range [-M, M] has step M / 32767.
    fq_in, fq_out = qat.get_layer("image_quant"), qat.get_layer("conv_quant")
    for tensor, fq in ((data, fq_in), (output, fq_out)):
        bound = max(abs(float(fq.min)), abs(float(fq.max)))
        np.testing.assert_allclose(tensor["quantization_parameters"]["scales"], bound / 32767, 1e-6)
        assert not np.any(tensor["quantization_parameters"]["zero_points"])
    # The bias in units of input step x weight step (numpy), as int64.
    bias_step = (
        data["quantization_parameters"]["scales"] * (weights["quantization_parameters"]["scales"])
    )
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    stored = interpreter.get_tensor(bias["index"])
    bias_values = np.array([0.3, -0.2, 0.1, 0.05], np.float32)
    # (millions of steps: float32 rounding of the quotient may move one unit)
    expected = np.round(bias_values.astype(np.float64) / bias_step)
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1)
    assert np.abs(stored).max() > 2**21  # beyond what int8 activations' bias steps reach
    # TFLite's 16x8 conv requantizes with a 15-bit multiplier: within one step.
    report = kq.compare_tflite(qat, tflite_bytes, x)
    assert report["max_diff_steps"] <= 1.01, report
    assert report["within_one_step"] >= 0.99, report


def int16_network():
    L = keras.layers
    inputs = keras.Input((8, 8, 3), name="image")
    a = L.Conv2D(8, 3, padding="same", activation="relu", name="a")(inputs)
    b = L.Conv2D(8, 1, name="b")(inputs)
    x = L.MaxPooling2D(2)(L.ReLU()(L.Add()([a, b])))
    x = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Conv2DTranspose(4, 3, strides=2, padding="same")(x)
    x = L.GlobalAveragePooling2D()(L.AveragePooling2D(2)(x))
    return keras.Model(inputs, L.Dense(5)(L.Dense(6, activation="relu")(x)))


def test_int16_activations_export_a_network_within_a_few_steps_of_keras():
    x = np.random.default_rng(2).uniform(-1, 1, (64, 8, 8, 3)).astype("float32")
    qat = calibrate(kq.convert_quant_network(int16_network(), **INT16), x)
    tflite_bytes = kq.export_tflite(qat, activations="int16")
    ops, tensors = ops_and_tensors(tflite_bytes)
    for op in ops:
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "SHAPE", "STRIDED_SLICE", "PACK"):
            kinds = {tensors[i]["dtype"] for i in list(op["inputs"]) + list(op["outputs"])}
            assert kinds <= {np.int16, np.int8, np.int32, np.int64}, (op["op_name"], kinds)
    # Each 16x8 kernel requantizes within a step; through eight ops the
    # output stays within a few of its 65,535 steps (1/256 of an int8 step).
    report = kq.compare_tflite(qat, tflite_bytes, x)
    assert report["max_diff_steps"] <= 8.01, report
    assert report["within_one_step"] >= 0.85, report
    assert report["top1_agreement"] == 1.0, report


def test_int16_export_refuses_what_it_cannot_export():
    x = np.random.default_rng(3).uniform(-1, 1, (32, 8, 8, 3)).astype("float32")
    eight_bit = calibrate(kq.convert_quant_network(int16_network()), x, steps=1)
    with pytest.raises(
        ValueError, match="16x8.*\n- 'image_quant' .* 8 bits, asymmetric, on the full grid"
    ):
        kq.export_tflite(eight_bit, activations="int16")
    with pytest.raises(ValueError, match="Received: activations='int4'"):
        kq.export_tflite(eight_bit, activations="int4")
    with pytest.raises(ValueError, match="Received: activations='int4'"):
        kq.check_exportable(eight_bit, activations="int4")
    with pytest.raises(ValueError, match="Received: activations='int16', input_type"):
        kq.export_tflite(eight_bit, activations="int16", input_type=tf.int8)
    inputs = keras.Input((8,))
    softmax = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    qat = calibrate(kq.convert_quant_network(softmax, **INT16), x.reshape(-1, 8)[:32])
    with pytest.raises(ValueError, match="fixed range"):
        kq.export_tflite(qat, activations="int16")
    images = keras.Input((8, 8, 3))
    halves = [keras.layers.Conv2D(2, 1)(images), keras.layers.Conv2D(2, 1)(images)]
    joined = keras.Model(images, keras.layers.Concatenate()(halves))
    qat = calibrate(kq.convert_quant_network(joined, **INT16), x)
    with pytest.raises(ValueError, match="no int16 CONCATENATION"):
        kq.export_tflite(qat, activations="int16")


def pixel_model(scale, offset):
    inputs = keras.Input((8, 8, 1), dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(scale, offset)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    pixels = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)).astype("uint8")
    qat_model = kq.convert_quant_network(model)
    kq.calibrate(qat_model, pixels, verbose=0)
    return qat_model, pixels


@pytest.mark.parametrize("scale, offset", [(1 / 255, 0.0), (1 / 128, -1.0)])
def test_uint8_pixels_export_as_an_all_integer_model_that_takes_them(scale, offset):
    """`Input(dtype="uint8")` then `Rescaling`: the rescaled pixels are on
    an exact 8-bit grid, so the TFLite model takes the uint8 pixels
    themselves (before: CAST and MUL left in float at the input)."""
    qat_model, pixels = pixel_model(scale, offset)
    tflite_bytes = kq.export_tflite(qat_model)
    assert float_ops(tflite_bytes) == []
    detail = tflite_interpreter(tflite_bytes).get_input_details()[0]
    assert detail["dtype"] == np.uint8
    assert detail["quantization"][0] == pytest.approx(scale, rel=1e-6)
    assert detail["quantization"][1] == round(-offset / scale)
    report = kq.compare_tflite(qat_model, tflite_bytes, pixels)
    assert report["max_diff_steps"] <= 1.001, report
    stripped, _ = kq.run_tflite(kq.strip_tflite_names(tflite_bytes), pixels)
    np.testing.assert_array_equal(stripped, kq.run_tflite(tflite_bytes, pixels)[0])
    # The grid after the Rescaling holds every rescaled pixel exactly.
    rescaled = pixels.astype("float32") * np.float32(scale) + np.float32(offset)
    quantizer = next(
        layer for layer in qat_model.layers if getattr(layer, "fixed_range", None) is not None
    )
    np.testing.assert_allclose(quantizer(rescaled).numpy(), rescaled, atol=1e-6)


def test_pixels_off_an_exact_grid_are_rescaled_in_float():
    qat_model, pixels = pixel_model(1 / 127.5, -1.0)  # zero point 127.5: no level on 0
    with pytest.raises(ValueError, match="float compute ops"):
        kq.export_tflite(qat_model)
    tflite_bytes = kq.export_tflite(qat_model, allow_float_ops=True)
    detail = tflite_interpreter(tflite_bytes).get_input_details()[0]
    assert detail["dtype"] == np.uint8 and detail["quantization"] == (0.0, 0)
    assert kq.compare_tflite(qat_model, tflite_bytes, pixels)["max_diff_steps"] <= 1.001


@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
def test_a_fixed_range_output_concatenated_is_named_before_the_converter(activation):
    """TFLite's sigmoid / hard sigmoid / tanh outputs have fixed ranges that
    TF 2.21's converter does not requantize for a CONCATENATION (before:
    its "same scale constraint" error from inside the conversion)."""
    inputs = keras.Input((6,), name="a")
    gate = keras.layers.Dense(5, activation=activation, name="gate")(inputs)
    branch = keras.layers.Dense(5, activation="relu")(inputs)
    joined = keras.layers.Concatenate(name="joined")([branch, gate])
    qat_model = kq.convert_quant_network(keras.Model(inputs, keras.layers.Dense(3)(joined)))
    x = np.random.default_rng(0).uniform(-1, 1, (32, 6)).astype("float32")
    kq.calibrate(qat_model, x, verbose=0)
    fixed = [layer.name for layer in qat_model.layers if getattr(layer, "fixed_range", None)]
    assert len(fixed) == 1
    with pytest.raises(ValueError, match=rf"'joined' .* puts '{fixed[0]}' on its own grid"):
        kq.check_exportable(qat_model)
    with pytest.raises(ValueError, match="apply that activation after the concatenation"):
        kq.export_tflite(qat_model)
