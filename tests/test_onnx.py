"""`export_onnx`: a QDQ ONNX model that ONNX Runtime runs on its integer
kernels, with TFLite's int8 weights and int32 biases, checked against the
Keras model, the TFLite model and ONNX Runtime's optimized graph."""

import collections

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export import onnx_graph
from keras_qat.export.interpreter import tflite_interpreter

onnx = pytest.importorskip("onnx", reason="the `onnx` extra")
ort = pytest.importorskip("onnxruntime", reason="the `onnx` extra")
from onnx import helper, numpy_helper  # noqa: E402

L = keras.layers


def cnn():
    """conv-BN-ReLU, a depthwise block with ReLU6 and a residual add, global
    pooling and a Dense: the CNN ops of the examples."""
    inputs = keras.Input((10, 10, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(inputs)))
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = L.ReLU(6.0)(L.BatchNormalization()(y))
    y = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False)(y))
    x = L.MaxPooling2D()(L.Add()([x, y]))
    return keras.Model(inputs, L.Dense(5)(L.GlobalAveragePooling2D()(x)))


def encoder():
    """Patches, a position table, attention, layer norms and a GELU MLP."""
    inputs = keras.Input((8, 8, 1), name="image")
    x = L.Reshape((16, 8))(L.Conv2D(8, 2, strides=2)(inputs))
    attended = L.MultiHeadAttention(2, 4)(x, x)
    x = L.LayerNormalization()(L.Add()([x, attended]))
    mlp = L.Dense(8)(L.Dense(16, activation="gelu")(x))
    x = L.LayerNormalization()(L.Add()([x, mlp]))
    return keras.Model(inputs, L.Dense(4)(L.GlobalAveragePooling1D()(x)))


def trained(model, x, **options):
    qat = kq.convert_quant_network(model, bn_fold=True, **options)
    qat.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = np.random.default_rng(1).integers(0, model.output.shape[-1], len(x))
    qat.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return qat


def images(n, shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype("float32")


@pytest.fixture(scope="module")
def exported_cnn():
    keras.utils.set_random_seed(3)
    x = images(96, (10, 10, 3))
    qat = trained(cnn(), x[:64], per_channel=[True, False], symmetric=[True, False])
    return qat, x, kq.export_onnx(qat), kq.export_tflite(qat)


def _initializers(model):
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _optimized_ops(onnx_bytes, tmp_path):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    )


def test_cnn_follows_the_keras_and_the_tflite_model(exported_cnn):
    qat, x, onnx_bytes, tflite_bytes = exported_cnn
    report = kq.compare_onnx(qat, onnx_bytes, x)
    assert report["max_diff_steps"] <= 1.001 and report["top1_agreement_unambiguous"] == 1.0, report
    onnx_out, scale = kq.run_onnx(onnx_bytes, x, batch_size=40)
    tflite_out, tflite_scale = kq.run_tflite(tflite_bytes, x)
    assert scale == pytest.approx(tflite_scale)
    assert np.abs(onnx_out - tflite_out).max() <= 1.001 * scale


def _onnx_layout(tflite_tensor, shape):
    """A TFLite kernel (O, H, W, I; a depthwise one 1, H, W, O) in ONNX's
    (O, I, H, W) layout, or a bias as it is; None if neither fits."""
    if tflite_tensor.ndim == 1:
        return tflite_tensor
    for axes in ((0, 3, 1, 2), (3, 0, 1, 2)):
        moved = np.transpose(tflite_tensor, axes)
        if moved.shape == shape:
            return moved
    return None


@pytest.mark.parametrize("activation_dtype", ["uint8", "int8"])
def test_weights_are_tflites_per_channel_levels_and_biases_its_int32(
    exported_cnn, activation_dtype
):
    # With uint8 activations the weights are uint8 too, the levels moved by
    # 128 (ONNX Runtime's x86 kernels for uint8 activations with int8
    # weights saturate on CPUs without VNNI: docs/onnx.md).
    qat, _, onnx_bytes, tflite_bytes = exported_cnn
    if activation_dtype == "int8":
        onnx_bytes = kq.export_onnx(qat, activation_dtype="int8")
    weight_type = np.dtype(activation_dtype)
    model = onnx.load_from_string(onnx_bytes)
    values = _initializers(model)
    produced_by = {o: n for n in model.graph.node for o in n.output}
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    tflite = [
        (t["quantization_parameters"]["scales"], interpreter.get_tensor(t["index"]))
        for t in interpreter.get_tensor_details()
        if t["dtype"] in (np.int8, np.int32) and len(t["quantization_parameters"]["scales"]) > 1
    ]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4  # conv, depthwise, 1x1, the Dense
    for conv in convs:
        for operand, dtype in ((conv.input[1], weight_type), (conv.input[2], np.int32)):
            dequantize = produced_by[operand]
            assert dequantize.op_type == "DequantizeLinear"
            integers, scales = values[dequantize.input[0]], values[dequantize.input[1]]
            assert integers.dtype == dtype and scales.shape == (integers.shape[0],)
            zero_points = values[dequantize.input[2]]
            assert zero_points.dtype == dtype and np.all(zero_points == (dtype == np.uint8) * 128)
            shape = (-1,) + (1,) * (integers.ndim - 1)
            integers = integers.astype(np.int32) - zero_points.reshape(shape)
            # TFLite's integers with its per-channel scales, in ONNX's layout.
            same = [
                np.array_equal(integers, _onnx_layout(t.astype(np.int32), integers.shape))
                for s, t in tflite
                if s.shape == scales.shape and np.allclose(s, scales, rtol=1e-6)
            ]
            assert any(same), conv.name


def test_onnx_runtime_runs_every_convolution_on_integers(exported_cnn, tmp_path):
    _, _, onnx_bytes, _ = exported_cnn
    ops = _optimized_ops(onnx_bytes, tmp_path)
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0, ops
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0, ops


def _zero_point_types(onnx_bytes):
    model = onnx.load_from_string(onnx_bytes)
    values = _initializers(model)
    return {
        values[node.input[2]].dtype.name
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear")
    }


def _quantize_zero_points(onnx_bytes):
    model = onnx.load_from_string(onnx_bytes)
    values = _initializers(model)
    return [values[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]


def test_int8_activations_are_kept_on_request(exported_cnn):
    qat, x, uint8_bytes, _ = exported_cnn
    int8_bytes = kq.export_onnx(qat, activation_dtype="int8", opset=13)
    assert _zero_point_types(int8_bytes) == {"int8", "int32"}  # int32: the biases
    assert _zero_point_types(uint8_bytes) == {"uint8", "int32"}  # the weights are uint8 too
    # Each activation's uint8 zero point is its int8 one moved by 128: the same values.
    int8_points = _quantize_zero_points(int8_bytes)
    uint8_points = _quantize_zero_points(uint8_bytes)
    assert len(int8_points) == len(uint8_points) >= 8  # the same graph, in the same order
    for point, moved in zip(int8_points, uint8_points):
        assert point.dtype == np.int8 and moved.dtype == np.uint8
        assert int(moved) == int(point) + 128
    int8_out, scale = kq.run_onnx(int8_bytes, x)
    uint8_out, _ = kq.run_onnx(uint8_bytes, x)
    assert np.abs(int8_out - uint8_out).max() <= 1.001 * scale


def test_transformer_block_exports_with_integer_matrix_products(tmp_path):
    x = images(96, (8, 8, 1))
    qat = trained(encoder(), x[:64])
    onnx_bytes = kq.export_onnx(qat, tmp_path / "encoder.onnx")
    assert (tmp_path / "encoder.onnx").read_bytes() == onnx_bytes
    report = kq.compare_onnx(qat, str(tmp_path / "encoder.onnx"), x)
    # Measured with three seeds: 0-0.03 steps on average, at most 1.
    assert report["mean_abs_diff"] <= 0.1 * report["output_scale"], report
    assert report["max_diff_steps"] <= 1.001, report
    assert report["top1_agreement_unambiguous"] == 1.0, report
    ops = _optimized_ops(onnx_bytes, tmp_path)
    assert ops["QLinearMatMul"] >= 2 and ops["MatMul"] == 0 and ops["Conv"] == 0, ops
    assert not [op for op in ops if op.startswith("TFL_")]


def test_inputs_and_outputs_keep_the_keras_names_and_order():
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    features = keras.Input((3,), name="features")
    pooled = L.GlobalAveragePooling1D()(L.Embedding(12, 4)(tokens))
    hidden = L.Dense(6, activation="relu")(L.Concatenate()([pooled, L.Dense(4)(features)]))
    model = keras.Model(
        [tokens, features], {"score": L.Dense(1)(hidden), "cls": L.Dense(3)(hidden)}
    )
    rng = np.random.default_rng(0)
    x = [rng.integers(0, 12, (64, 5)), rng.uniform(-1, 1, (64, 3)).astype("float32")]
    qat = kq.convert_quant_network(model)
    qat.compile("sgd", "mse")
    qat.fit(x, {"score": np.zeros((64, 1)), "cls": np.zeros((64, 3))}, verbose=0)
    onnx_bytes = kq.export_onnx(qat)
    graph = onnx.load_from_string(onnx_bytes).graph
    assert [i.name for i in graph.input] == ["tokens", "features"]
    assert [o.name for o in graph.output] == ["cls", "score"]  # keras.tree order of a dict
    by_list, _ = kq.run_onnx(onnx_bytes, x)
    by_name, _ = kq.run_onnx(onnx_bytes, {"features": x[1], "tokens": x[0]})
    keras_out = qat.predict(x, verbose=0)
    for got, again, key in zip(by_list, by_name, ["cls", "score"]):
        np.testing.assert_array_equal(got, again)
        assert got.shape == keras_out[key].shape
    reports = kq.compare_onnx(qat, onnx_bytes, x)
    assert [r["max_diff_steps"] <= 1.001 for r in reports] == [True, True], reports


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"opset": 12}, "opset=12"),
        ({"opset": "17"}, "opset='17'"),
        ({"activation_dtype": "float32"}, "activation_dtype='float32'"),
        ({"path": "/no/such/directory/model.onnx"}, "does not exist"),
    ],
)
def test_invalid_arguments_are_refused(exported_cnn, arguments, message):
    qat = exported_cnn[0]
    with pytest.raises(ValueError, match=message):
        kq.export_onnx(qat, **arguments)


def test_a_model_export_tflite_refuses_is_refused():
    inputs = keras.Input((4,))
    qat = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)))
    with pytest.raises(ValueError, match="not calibrated|no range|calibrate"):
        kq.export_onnx(qat)


def test_an_op_without_an_onnx_form_is_named(monkeypatch):
    """TFLite's GELU has no tf2onnx handler: without the decomposition it
    stays a `TFL_GELU` node, which the export names instead of writing a
    model ONNX Runtime cannot load."""
    inputs = keras.Input((6,))
    x = images(32, (6,))
    qat = trained(keras.Model(inputs, L.Dense(3)(L.Dense(8, activation="gelu")(inputs))), x)
    assert kq.compare_onnx(qat, kq.export_onnx(qat), x)["max_diff_steps"] <= 1.001
    monkeypatch.setattr(onnx_graph, "decompose_gelu", lambda model: None)
    with pytest.raises(ValueError, match=r"no ONNX form.*\(TFL_GELU\)"):
        kq.export_onnx(qat)


def test_float_compute_ops_are_found():
    weight = numpy_helper.from_array(np.ones((2, 3), np.float32), "weight")
    levels = numpy_helper.from_array(np.ones((3, 2), np.int8), "levels")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    nodes = [
        helper.make_node("DequantizeLinear", ["levels", "scale"], ["w8"], name="dq"),
        helper.make_node("MatMul", ["x", "w8"], ["y"], name="integer_operand_missing"),
        helper.make_node("MatMul", ["y", "weight"], ["z"], name="float_weight"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3])],
        [weight, levels, scale],
    )
    model = helper.make_model(graph)
    assert onnx_graph.float_compute_ops(model) == [
        "integer_operand_missing (MatMul)",
        "float_weight (MatMul)",
    ]


def test_missing_extra_is_named(monkeypatch, exported_cnn):
    import importlib

    real = importlib.import_module

    def without_tf2onnx(name, *args):
        if name == "tf2onnx":
            raise ImportError("No module named 'tf2onnx'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_tf2onnx)
    with pytest.raises(ImportError, match=r"keras-qat\[onnx\]"):
        kq.export_onnx(exported_cnn[0])


def test_average_pooling_ties_round_as_each_runtime_defines():
    """Where ONNX Runtime and TFLite differ: a mean of integer levels that
    falls half-way between two levels. TFLite's int8 AVERAGE_POOL_2D rounds
    the mean of the stored integers half away from zero; ONNX's
    QuantizeLinear rounds the dequantized mean half to even (but for the
    few ties that float error moves: 3 of 1024 here). Both stay
    within half a step of the Keras model, which keeps the mean exact."""
    inputs = keras.Input((4, 4, 1))
    qat = kq.convert_quant_network(keras.Model(inputs, L.Flatten()(L.AveragePooling2D(2)(inputs))))
    x = images(256, (4, 4, 1))
    kq.calibrate(qat, x, verbose=0)
    tflite_out, scale = kq.run_tflite(kq.export_tflite(qat), x)
    onnx_bytes = kq.export_onnx(qat, activation_dtype="int8")
    onnx_out, _ = kq.run_onnx(onnx_bytes, x)
    zero_point = next(
        int(v)
        for v in _initializers(onnx.load_from_string(onnx_bytes)).values()
        if v.dtype == np.int8
    )
    levels = np.clip(np.round(x / scale) + zero_point, -128, 127)
    sums = levels.reshape(-1, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4, 4).sum(-1)
    away_from_zero = np.sign(sums) * np.floor(np.abs(sums) / 4 + 0.5)
    to_even = np.round(sums / 4 - zero_point) + zero_point
    np.testing.assert_allclose(tflite_out, (away_from_zero - zero_point) * scale, atol=1e-6)
    # ONNX Runtime averages dequantized floats: float error decides a few ties.
    assert np.mean(np.abs(onnx_out - (to_even - zero_point) * scale) > scale / 2) <= 0.01
    assert 0.05 < np.mean(away_from_zero != to_even) < 0.3  # measured: 12 % of outputs
    keras_out = qat.predict(x, verbose=0)
    for out in (tflite_out, onnx_out):
        assert np.abs(out - keras_out).max() <= 0.5001 * scale


def _moving_graph():
    """x -> QuantizeLinear -> Concat with an int8 constant, and Concat of the
    quantized tensor with itself -> DequantizeLinear: the integer data
    movement tf2onnx writes (a class token concatenated to a sequence)."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(3, np.int8), "zero")
    token = numpy_helper.from_array(np.array([[-7, 12], [5, 0]], np.int8), "token")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"], name="q"),
        helper.make_node("Concat", ["xq", "token"], ["with_token"], axis=1, name="cat_token"),
        helper.make_node("Concat", ["xq", "xq"], ["twice"], axis=1, name="cat_twice"),
        helper.make_node("DequantizeLinear", ["with_token", "scale", "zero"], ["a"], name="dq_a"),
        helper.make_node("DequantizeLinear", ["twice", "scale", "zero"], ["b"], name="dq_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "moving",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [2, 6]),
        ],
        [scale, zero, token],
    )
    return helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_data_movement_rewrite_keeps_constants_and_repeated_operands():
    """An int8 constant concatenated to a quantized tensor is dequantized
    with the concatenation's quantization (before: float and int8 operands
    of one Concat, which ONNX Runtime refused to load), and a tensor read
    twice by one node gets a DequantizeLinear per read (before: two nodes
    wrote one name, not a valid graph)."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3)).astype("float32")
    expected = _run(_moving_graph(), x)
    model = _moving_graph()
    onnx_graph.requantize_data_movement(model)
    onnx_graph.activations_as_uint8(model)
    onnx_graph.remove_unused_initializers(model)
    onnx.checker.check_model(model, full_check=True)
    for got, want in zip(_run(model, x), expected):
        np.testing.assert_array_equal(got, want)
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(produced_by[i] == "DequantizeLinear" for n in concats for i in n.input)


def test_an_output_named_like_an_input_is_renamed(tmp_path):
    inputs = keras.Input((4,), name="image")
    model = keras.Model(inputs, {"image": L.Dense(4)(inputs), "cls": L.Dense(2)(inputs)})
    x = images(32, (4,))
    qat = kq.convert_quant_network(model)
    kq.calibrate(qat, x, verbose=0)
    onnx_bytes = kq.export_onnx(qat)
    graph = onnx.load_from_string(onnx_bytes).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["cls", "image_output"]
    reports = kq.compare_onnx(qat, onnx_bytes, {"image": x})
    assert [r["max_diff_steps"] <= 1.001 for r in reports] == [True, True], reports


def test_run_onnx_refuses_bad_arguments(exported_cnn):
    _, x, onnx_bytes, _ = exported_cnn
    for batch_size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"Received: batch_size={batch_size!r}"):
            kq.run_onnx(onnx_bytes, x, batch_size=batch_size)
    with pytest.raises(ValueError, match="Received: onnx_model=12"):
        kq.run_onnx(12, x)
    out, _ = kq.run_onnx(onnx.load_from_string(onnx_bytes), x[:5])  # an onnx.ModelProto
    assert out.shape == (5, 5)


def test_uint8_pixels_are_the_onnx_models_input():
    from test_export import pixel_model

    qat, pixels = pixel_model(1 / 255, 0.0)
    onnx_bytes = kq.export_onnx(qat)
    graph = onnx.load_from_string(onnx_bytes).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    report = kq.compare_onnx(qat, onnx_bytes, pixels)
    assert report["max_diff_steps"] <= 1.001, report
