"""Real workflows give the right answer or a clear error: frozen layers,
what layers carry through fusion, odd bit widths, bad first batches, shared
layers, degenerate ranges, dynamic shapes, mixed precision, Lambda layers,
model comparison, and Keras-style errors for bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qat as kq
from keras_qat.export.inspect import tflite_interpreter, tflite_ops

L = keras.layers
EXPORTABLE = dict(per_channel=[True, False], symmetric=[True, False], narrow_range=[True, False])
RNG = np.random.default_rng(0)


def fit(model, x, y, steps=3, lr=0.05):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


def images(n=32, size=8, channels=3):
    return RNG.uniform(-1, 1, (n, size, size, channels)).astype("float32")


# 1. Frozen layers and what layers carry.


def backbone():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
        ],
        name="backbone",
    )


def classifier(body):
    inputs = keras.Input((8, 8, 3))
    x = L.Flatten()(body(inputs))
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def frozen_state(model, names):
    return {
        v.path: v.numpy().copy()
        for layer in model.layers
        if layer.name in names
        for v in layer.weights
        if "step" not in v.path
    }


@pytest.mark.parametrize("how", ["layers", "nested_model", "after_conversion"])
@pytest.mark.parametrize("bn_fold", [True, False])
def test_frozen_layers_stay_bit_identical_through_qat(how, bn_fold):
    body = backbone()
    body.get_layer("bn").moving_variance.assign(RNG.uniform(0.5, 2, 4))
    if how == "layers":
        body.get_layer("conv").trainable = False
        body.get_layer("bn").trainable = False
    elif how == "nested_model":
        body.trainable = False
    model = classifier(body)
    float_trainable = sum(np.prod(v.shape) for v in model.trainable_weights)
    qat = kq.convert_quant_network(model, bn_fold=bn_fold, **EXPORTABLE)
    if how == "after_conversion":
        qat.get_layer("conv").trainable = False
    else:
        assert sum(np.prod(v.shape) for v in qat.trainable_weights) == float_trainable
    before = frozen_state(qat, {"conv"})
    x, y = images(), RNG.standard_normal((32, 3)).astype("float32")
    fit(qat, x, y)
    after = frozen_state(qat, {"conv"})
    assert before.keys() == after.keys() and len(before) >= 5  # kernel, bias, gamma, beta, stats
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert not np.array_equal(qat.get_layer("head").dense.kernel.numpy(), 0)  # the rest trained


def test_frozen_standalone_batchnorm_keeps_its_statistics_and_trains_nothing():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu")(inputs)  # an activated conv: the BN stands alone
    x = L.BatchNormalization(name="bn", trainable=False)(x)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    model.get_layer("bn").moving_mean.assign(RNG.uniform(-1, 1, 4))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    bn_layer = qat.get_layer("bn")
    assert isinstance(bn_layer, kq.QuantDepthwiseConv2DBnFoldAct) and not bn_layer.trainable
    assert sum(np.prod(v.shape) for v in qat.trainable_weights) == sum(
        np.prod(v.shape) for v in model.trainable_weights
    )
    before = frozen_state(qat, {"bn"})
    fit(qat, images(), RNG.standard_normal((32, 2)).astype("float32"))
    for path, value in frozen_state(qat, {"bn"}).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)


def test_standalone_batchnorm_trains_only_its_own_weights():
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn")(inputs)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    layer = qat.get_layer("bn")
    assert not layer.depthwise.trainable  # the 1x1 kernel of ones stays ones
    assert sum(np.prod(v.shape) for v in qat.trainable_weights) == sum(
        np.prod(v.shape) for v in model.trainable_weights
    )
    reloaded = kq.QuantDepthwiseConv2DBnFoldAct.from_config(layer.get_config())
    assert reloaded.get_config()["linear_trainable"] is False


def test_fusion_keeps_regularizers_constraints_and_dtype():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(
        4,
        3,
        kernel_regularizer=keras.regularizers.L2(0.1),
        kernel_constraint=keras.constraints.MaxNorm(0.5, axis=[0, 1, 2]),
        name="conv",
    )(inputs)
    x = L.BatchNormalization(
        gamma_regularizer=keras.regularizers.L2(0.2),
        beta_regularizer=keras.regularizers.L1(0.3),
        beta_constraint=keras.constraints.NonNeg(),
    )(x)
    x = L.Dense(3, dtype="float64", name="wide")(L.Flatten()(L.ReLU()(x)))
    outputs = L.Dense(2, activity_regularizer=keras.regularizers.L2(0.4))(x)
    model = keras.Model(inputs, outputs)
    x_data = images(4)
    model(x_data)
    fused = kq.fuse(model)
    fused(x_data)
    assert len(fused.losses) == len(model.losses) == 4
    np.testing.assert_allclose(
        sorted(float(v) for v in fused.losses), sorted(float(v) for v in model.losses), rtol=1e-5
    )
    conv = fused.get_layer("conv")
    assert isinstance(conv.conv.kernel_constraint, keras.constraints.MaxNorm)
    assert isinstance(conv.bn.beta_constraint, keras.constraints.NonNeg)
    assert fused.get_layer("wide").dtype_policy.name == "float64"
    qat = fit(kq.convert_quant_network(model, **EXPORTABLE), x_data, np.ones((4, 2)), lr=1.0)
    kernel = qat.get_layer("conv").conv.kernel.numpy()
    assert np.sqrt((kernel**2).sum(axis=(0, 1, 2))).max() <= 0.5 + 1e-5  # the constraint acted


def test_activity_regularizer_keeps_a_layer_from_absorbing_what_follows():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activity_regularizer=keras.regularizers.L2(0.1))(inputs)
    x = L.BatchNormalization()(x)
    model = keras.Model(inputs, x)
    fused = kq.fuse(model)
    x_data = images(4)
    np.testing.assert_allclose(fused(x_data), model(x_data), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(fused.losses[0]), float(model.losses[0]), rtol=1e-5)


# 2. Bit widths.


def tflite_weight_levels(tflite_bytes, op_name="CONV_2D", which=0):
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    op = [op for op in tflite_ops(interpreter) if op["op_name"] == op_name][which]
    index = op["inputs"][1]
    return interpreter.get_tensor(index).astype(np.int64), tensors[index]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_weight_width_exports_its_trained_levels(bits, per_channel):
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, L.Conv2D(5, 3, name="conv")(inputs))
    qat = kq.convert_quant_network(
        model,
        num_bits=(bits, 8),
        per_channel=[per_channel, False],
        symmetric=[True, False],
        narrow_range=[True, False],
    )
    x = images(32, 6)
    fit(qat, x, np.zeros((32, 4, 4, 5), "float32"), steps=1)
    layer = qat.get_layer("conv")
    quantizer = layer.weight_quantizer
    kernel = layer.kernel()
    scale = quantizer.grid_scale(*quantizer.range(kernel)).numpy()
    levels = np.round(quantizer.quantize_weights(kernel).values.numpy() / scale).astype(np.int64)
    assert np.abs(levels).max() == 2 ** (bits - 1) - 1
    stored, detail = tflite_weight_levels(kq.export_tflite(qat))
    np.testing.assert_array_equal(np.transpose(stored, (1, 2, 3, 0)), levels)
    np.testing.assert_allclose(detail["quantization_parameters"]["scales"], scale, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_weight_ranges_export_their_trained_levels_and_steps(bits, per_channel):
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, L.Conv2D(5, 3, name="conv")(inputs))
    qat = kq.convert_quant_network(
        model, num_bits=(bits, 8), per_channel=[per_channel, False], range_learning=True
    )
    x = images(32, 6)
    qat.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    for _ in range(3):  # the steps move away from the kernel's own range
        qat.train_on_batch(x, RNG.normal(size=(32, 4, 4, 5)).astype("float32"))
    quantizer = qat.get_layer("conv").weight_quantizer
    step = quantizer.scale.numpy()
    kernel_step = kq.WeightQuantizer(bits, True, True, per_channel).grid_scale(
        *kq.WeightQuantizer(bits, True, True, per_channel).range(qat.get_layer("conv").kernel())
    )
    assert not np.allclose(step, kernel_step.numpy(), rtol=1e-3)  # learned, not min / max
    levels = np.round(quantizer.quantize_weights(qat.get_layer("conv").kernel()).values / step)
    assert np.abs(levels).max() <= 2 ** (bits - 1) - 1
    stored, detail = tflite_weight_levels(kq.export_tflite(qat))
    np.testing.assert_array_equal(np.transpose(stored, (1, 2, 3, 0)), levels.astype(np.int64))
    np.testing.assert_allclose(detail["quantization_parameters"]["scales"], step, rtol=1e-6)


def three_convs():
    inputs = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, activation="relu", name="first")(inputs)
    x = L.Conv2D(4, 3, activation="relu", name="middle")(x)
    return keras.Model(inputs, L.Conv2D(2, 1, name="last")(x))


def test_layer_num_bits_set_the_named_layers_widths_through_saving(tmp_path):
    qat = kq.convert_quant_network(
        three_convs(),
        num_bits=(4, 6),
        layer_num_bits={"image": 8, "first": (8, None), "last": (3, 7)},
        range_learning=(True, False),
    )
    widths = {
        layer.name: (getattr(layer, "weight_quantizer", layer).num_bits)
        for layer in qat.layers
        if hasattr(layer, "weight_quantizer") or isinstance(layer, kq.FakeQuant)
    }
    assert widths == {
        "image_quant": 8,
        "first": 8,
        "first_quant": 6,
        "middle": 4,
        "middle_quant": 6,
        "last": 3,
        "last_quant": 7,
    }
    path = str(tmp_path / "mixed.keras")
    qat.save(path)
    loaded = keras.saving.load_model(path)
    assert [getattr(layer, "weight_quantizer", layer).num_bits for layer in loaded.layers[1:]] == (
        list(widths.values())
    )


def test_layer_num_bits_export_eight_bit_ends_of_a_four_bit_model():
    qat = kq.convert_quant_network(
        three_convs(), num_bits=(4, 8), layer_num_bits={"first": (8, None), "last": 8}
    )
    x = images(32, 6)
    fit(qat, x, np.zeros((32, 2, 2, 2), "float32"), steps=1)
    tflite_bytes = kq.export_tflite(qat)
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    tensors = flat.subgraphs[0].tensors
    kernels = [tensors[op.inputs[1]] for op in flat.subgraphs[0].operators if len(op.inputs) == 3]
    assert [t.type for t in kernels] == [
        schema.TensorType.INT8,
        schema.TensorType.INT4,
        schema.TensorType.INT8,
    ]
    for which, bits in enumerate((8, 4, 8)):
        stored, _ = tflite_weight_levels(tflite_bytes, which=which)
        assert np.abs(stored).max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize(
    "layer_num_bits, match",
    [
        ({"nope": 8}, "has no layer named 'nope'"),
        ({"image": (8, None)}, "'image' weights"),
        ({"image": 8, "first": (None, 17)}, r"layer_num_bits\['first'\]\[1\]"),
        (["first"], "expected a dict"),
    ],
)
def test_invalid_layer_num_bits_are_value_errors(layer_num_bits, match):
    with pytest.raises(ValueError, match=match):
        kq.convert_quant_network(three_convs(), layer_num_bits=layer_num_bits)


# 3. Bad first batches.


def test_an_all_zero_first_batch_does_not_collapse_the_range_through_fit():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(3)(inputs))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    qat.fit(np.zeros((8, 4), "float32"), np.zeros((8, 3), "float32"), verbose=0)
    x = RNG.uniform(-2, 3, (64, 4)).astype("float32")
    qat.fit(x, np.zeros((64, 3), "float32"), batch_size=64, verbose=0)
    input_quant = qat.layers[1]
    assert (input_quant.min.numpy(), input_quant.max.numpy()) == (x.min(), x.max())
    predictions = qat.predict(x, verbose=0)
    assert len(np.unique(predictions.round(4), axis=0)) > 32  # not constant


# 4. Shared layers.


def test_a_shared_layer_counts_one_step_per_training_step():
    a, b = keras.Input((4,)), keras.Input((4,))
    shared = L.Dense(3, name="shared")
    single = L.Dense(3, name="single")
    model = keras.Model([a, b], [shared(a), shared(b), single(a)])
    qat = kq.convert_quant_network(model, quant_delay=3, **EXPORTABLE)
    assert qat.get_layer("shared").weight_quantizer.calls_per_step == 2
    x = [RNG.uniform(-1, 1, (8, 4)).astype("float32") for _ in range(2)]
    qat.compile(optimizer=keras.optimizers.SGD(0.0), loss=["mse"] * 3)
    y = [np.zeros((8, 3), "float32")] * 3
    for step in range(5):
        qat.train_on_batch(x, y)
        for name in ("shared", "single"):
            assert int(qat.get_layer(name).weight_quantizer.steps()) == step + 1, (name, step)
    assert int(qat.get_layer("shared").weight_quantizer.step.numpy()) == 10  # calls


def test_a_shared_folded_layer_freezes_with_the_rest():
    a, b = keras.Input((6, 6, 2)), keras.Input((6, 6, 2))
    conv = kq.Conv2DBnAct(3, 3, has_bn=True, name="conv")
    model = keras.Model([a, b], [conv(a), conv(b)])
    qat = kq.convert_quant_network(model, freeze_bn=2, **EXPORTABLE)
    x = [images(8, 6, 2) for _ in range(2)]
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
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    shared = L.Dense(3, name="shared", bias_initializer=keras.initializers.Constant(0.123456))
    qat = kq.convert_quant_network(keras.Model([a, b], [shared(a), shared(b)]), **EXPORTABLE)
    x = [RNG.uniform(-1, 1, (16, 4)).astype("float32"), RNG.uniform(-5, 5, (16, 4)).astype("f4")]
    fit(qat, x, [np.zeros((16, 3), "float32")] * 2, steps=1, lr=0.0)
    kq.check_exportable(qat)  # both calls know their input grid
    tflite_bytes = kq.export_tflite(qat)
    for report in kq.compare_tflite(qat, tflite_bytes, x):
        assert report["within_one_step"] == 1.0, report


# 5. Degenerate ranges.


def test_export_refuses_a_range_that_never_saw_values_naming_the_layer():
    inputs = keras.Input((4,))
    dead = L.Dense(3, activation="relu", bias_initializer=keras.initializers.Constant(-100.0))
    model = keras.Model(inputs, L.Dense(2)(dead(inputs)))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    fit(qat, RNG.uniform(0, 1, (8, 4)), np.zeros((8, 2)), steps=1, lr=0.0)
    with pytest.raises(ValueError, match=r"'dense_\d*_?quant' \(FakeQuant\) has no range"):
        kq.export_tflite(qat)
    zero = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)), **EXPORTABLE)
    fit(zero, np.zeros((8, 4), "float32"), np.zeros((8, 2)), steps=2, lr=0.0)
    with pytest.raises(ValueError, match="has no range"):
        kq.export_tflite(zero)


def test_an_all_zero_weight_channel_exports_and_matches():
    inputs = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3, name="conv")
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(conv(inputs))))
    kernel = conv.kernel.numpy()
    kernel[..., 1] = 0.0
    conv.kernel.assign(kernel)
    conv.bias.assign([0.1, 0.2, -0.3, 0.0])
    x = images(32, 6)
    qat = fit(kq.convert_quant_network(model, **EXPORTABLE), x, np.zeros((32, 2)), steps=1, lr=0.0)
    report = kq.compare_tflite(qat, kq.export_tflite(qat), x)
    assert report["within_one_step"] == 1.0, report


# 6. Dynamic shapes.


def test_unknown_spatial_size_exports_and_runs_after_resizing():
    inputs = keras.Input((None, None, 3))
    x = L.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    data = images(16, 9)
    qat = fit(kq.convert_quant_network(model, **EXPORTABLE), data, np.zeros((16, 4)), steps=2)
    tflite_bytes = kq.export_tflite(qat)
    interpreter = tflite_interpreter(tflite_bytes, allocate=False)
    (detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(detail["index"], [2, 12, 12, 3])
    interpreter.allocate_tensors()
    report = kq.compare_tflite(qat, tflite_bytes, data)
    assert report["within_one_step"] == 1.0, report


# 7. Mixed precision.


def test_a_mixed_precision_model_exports_like_its_float32_twin():
    def build():
        inputs = keras.Input((8, 8, 3))
        x = L.Conv2D(4, 3, activation="relu", name="conv")(inputs)
        return keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x)))

    x = images(32)
    keras.config.set_dtype_policy("mixed_float16")
    mixed = fit(kq.convert_quant_network(build(), **EXPORTABLE), x, np.zeros((32, 2)), steps=2)
    keras.config.set_dtype_policy("float32")
    twin = kq.convert_quant_network(build(), **EXPORTABLE)
    twin.set_weights(mixed.get_weights())
    mixed_bytes, twin_bytes = kq.export_tflite(mixed), kq.export_tflite(twin)
    for which in (0, 1):  # the conv, and the dense (a 1x1 conv with per-channel weights)
        mixed_levels, mixed_detail = tflite_weight_levels(mixed_bytes, "CONV_2D", which)
        twin_levels, twin_detail = tflite_weight_levels(twin_bytes, "CONV_2D", which)
        np.testing.assert_array_equal(mixed_levels, twin_levels)
        np.testing.assert_array_equal(
            mixed_detail["quantization_parameters"]["scales"],
            twin_detail["quantization_parameters"]["scales"],
        )
    np.testing.assert_array_equal(kq.run_tflite(mixed_bytes, x)[0], kq.run_tflite(twin_bytes, x)[0])


# 8. Lambda layers.


def lambda_model():
    inputs = keras.Input((4,))
    x = L.Dense(3, name="dense")(inputs)
    x = L.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(x)
    return keras.Model(inputs, L.Dense(2, name="head")(x))


def test_a_lambda_layer_is_listed_or_skipped_and_stays_as_it_is():
    model = lambda_model()
    with pytest.raises(ValueError, match=r"'affine' \(Lambda\).*skip_layers"):
        kq.convert_quant_network(model)
    fused = kq.fuse(model, skip_layers=["affine"])
    x = RNG.uniform(-1, 1, (8, 4)).astype("float32")
    np.testing.assert_allclose(fused(x), model(x), rtol=1e-6)
    qat = kq.convert_quant_network(model, skip_layers=["affine"], **EXPORTABLE)
    assert qat.get_layer("affine").function is model.get_layer("affine").function
    fit(qat, x, np.zeros((8, 2)), steps=2)
    report = kq.compare_tflite(qat, kq.export_tflite(qat, allow_float_ops=True), x)
    assert report["within_one_step"] >= 0.99, report


# 9. Comparing and running.


def test_compare_handles_one_unit_float_and_multi_io_outputs():
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(5)(a), L.Dense(5)(b)])
    one_unit = L.Dense(1, name="one_unit")(h)
    float_head = L.Dense(2, name="float_head")(h)
    model = keras.Model({"a": a, "b": b}, [one_unit, float_head])
    qat = kq.convert_quant_network(model, skip_layers=["float_head"], **EXPORTABLE)
    x = {
        "a": RNG.uniform(-1, 1, (16, 4)).astype("f4"),
        "b": RNG.uniform(-1, 1, (16, 3)).astype("f4"),
    }
    fit(qat, x, [np.zeros((16, 1)), np.zeros((16, 2))], steps=2)
    tflite_bytes = kq.export_tflite(qat, allow_float_ops=True)
    one, floats = kq.compare_tflite(qat, tflite_bytes, x)
    assert one["top1_agreement"] is None and one["within_one_step"] == 1.0
    assert floats["output_scale"] is None and floats["within_one_step"] is None
    assert floats["max_abs_diff"] < 1e-4 and floats["top1_agreement"] == 1.0
    listed = kq.compare_tflite(qat, tflite_bytes, [x["a"], x["b"]])
    assert listed == [one, floats]
    outputs, scales = kq.run_tflite(tflite_bytes, x)
    assert [o.shape for o in outputs] == [(16, 1), (16, 2)] and scales[1] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        kq.compare_tflite(qat, tflite_bytes, {"a": x["a"][:0], "b": x["b"][:0]})
    with pytest.raises(ValueError, match="without"):
        kq.run_tflite(tflite_bytes, {"a": x["a"]})


# 10. Clear errors.


def test_converting_a_quantization_network_again_is_refused():
    inputs = keras.Input((4,))
    qat = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)))
    with pytest.raises(ValueError, match="already a quantization network"):
        kq.convert_quant_network(qat)


@pytest.mark.parametrize(
    "layer, match",
    [
        (L.Conv2D(4, 3, data_format="channels_first"), "data_format='channels_first'"),
        (L.Dense(2, lora_rank=2), "lora_rank=2"),
    ],
    ids=["channels_first", "lora"],
)
def test_an_unsupported_attribute_is_named(layer, match):
    inputs = keras.Input((3, 8, 8) if isinstance(layer, L.Conv2D) else (4,))
    with pytest.raises(ValueError, match=match):
        kq.convert_quant_network(keras.Model(inputs, layer(inputs)))


def test_batchnorm_without_center_or_scale_folds_and_exports():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3)(inputs)
    x = L.BatchNormalization(center=False, scale=False)(x)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(L.ReLU()(x))))
    data = images(32)
    qat = fit(kq.convert_quant_network(model, **EXPORTABLE), data, np.zeros((32, 2)), steps=2)
    assert isinstance(qat.layers[2], kq.QuantConv2DBnFoldAct)
    report = kq.compare_tflite(qat, kq.export_tflite(qat), data)
    assert report["within_one_step"] == 1.0, report


def test_a_grouped_convolution_folds_and_exports_exactly():
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(6, 3, groups=2, name="grouped")(inputs)
    x = L.ReLU()(L.BatchNormalization()(x))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    layer = qat.get_layer("grouped")
    assert isinstance(layer, kq.QuantConv2DBnFoldAct) and layer.conv.groups == 2
    data = images(32, 8, 4)
    fit(qat, data, np.zeros((32, 3)), steps=2)
    report = kq.compare_tflite(qat, kq.export_tflite(qat), data)
    assert report["within_one_step"] == 1.0, report


def test_integer_image_input_is_quantized_after_its_rescaling():
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    x = L.Rescaling(1 / 255.0)(inputs)
    x = L.Conv2D(4, 3, activation="relu")(x)
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(x)))
    qat = kq.convert_quant_network(model, **EXPORTABLE)
    kinds = [type(layer).__name__ for layer in qat.layers[:4]]
    assert kinds == ["InputLayer", "Rescaling", "FakeQuant", "QuantConv2DBnAct"]
    data = RNG.integers(0, 256, (32, 8, 8, 3)).astype("uint8")
    fit(qat, data, np.zeros((32, 2)), steps=2)
    assert qat.layers[2].max.numpy() > 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(skip_layers=3), "skip_layers"),
        (dict(skip_layers=[L.Dense(2)]), "pass its name"),
        (dict(symmetric="no"), "symmetric"),
        (dict(quant_delay=2.0), "quant_delay"),
    ],
)
def test_invalid_conversion_options_are_value_errors(kwargs, match):
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match=match):
        kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)), **kwargs)


def test_numpy_scalars_are_accepted_where_python_ones_are():
    inputs = keras.Input((4,))
    qat = kq.convert_quant_network(
        keras.Model(inputs, L.Dense(2)(inputs)),
        num_bits=np.int64(6),
        quant_delay=np.int32(2),
        symmetric=np.bool_(True),
    )
    assert qat.layers[2].weight_quantizer.num_bits == 6
    assert type(qat.layers[2].weight_quantizer.quant_delay) is int
    assert kq.FakeQuant(ema_decay=np.float32(0.5), axis=np.int64(1)).axis == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ema_decay="0.9"), "ema_decay"),
        (dict(axis=1.0), "axis"),
        (dict(symmetric="no"), "symmetric"),
        (dict(fixed_range=(-np.inf, np.inf)), "fixed_range"),
        (dict(fixed_range=(np.nan, 1.0)), "fixed_range"),
    ],
)
def test_invalid_fake_quant_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kq.FakeQuant(**kwargs)


@pytest.mark.parametrize("low, high", [(1.0, -1.0), (np.nan, 1.0), (-1.0, np.inf)])
def test_fake_quant_refuses_an_invalid_number_range(low, high):
    with pytest.raises(ValueError, match="min_val <= max_val"):
        kq.fake_quant(tf.zeros((2,)), low, high)


def test_export_path_must_be_a_path_in_an_existing_directory(tmp_path):
    inputs = keras.Input((4,))
    qat = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)), **EXPORTABLE)
    fit(qat, RNG.uniform(-1, 1, (8, 4)), np.zeros((8, 2)), steps=1)
    with pytest.raises(ValueError, match="path"):
        kq.export_tflite(qat, 3)
    with pytest.raises(ValueError, match="does not exist"):
        kq.export_tflite(qat, tmp_path / "missing" / "m.tflite")
    kq.export_tflite(qat, tmp_path / "m.tflite")  # a pathlib.Path
    assert (tmp_path / "m.tflite").stat().st_size > 0


def test_a_skipped_lstm_needs_select_tf_ops_and_says_so():
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, L.Dense(2)(L.LSTM(4, name="lstm")(inputs)))
    with pytest.raises(ValueError, match=r"'lstm' \(LSTM: recurrent"):
        kq.convert_quant_network(model)
    qat = kq.convert_quant_network(model, skip_layers=["lstm"], **EXPORTABLE)
    x = RNG.uniform(-1, 1, (16, 5, 3)).astype("float32")
    fit(qat, x, np.zeros((16, 2)), steps=1)
    with pytest.raises(ValueError, match="select_tf_ops=True"):
        kq.export_tflite(qat, allow_float_ops=True)
    tflite_bytes = kq.export_tflite(qat, allow_float_ops=True, select_tf_ops=True)
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False, allocate=False)
    names = {op["op_name"] for op in tflite_ops(interpreter)}
    assert any(name.startswith("Flex") for name in names) and "CONV_2D" in names  # the Dense
