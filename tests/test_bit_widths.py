"""Weight widths from 2 to 8 bits export the integer levels that training
used, with min / max or learned ranges, and `layer_num_bits` gives named
layers their own widths, through saving and export."""

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export.interpreter import tflite_interpreter, tflite_ops

L = keras.layers


def fit(model, x, y, steps=3, lr=0.05):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


def images(rng, n=32, size=6, channels=3):
    return rng.uniform(-1, 1, (n, size, size, channels)).astype("float32")


def tflite_weight_levels(tflite_bytes, op_name="CONV_2D", which=0):
    """The stored integer weights of the `which`-th `op_name` op, and the
    details of their tensor."""
    interpreter = tflite_interpreter(tflite_bytes, default_delegates=False)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    op = [op for op in tflite_ops(interpreter) if op["op_name"] == op_name][which]
    index = op["inputs"][1]
    return interpreter.get_tensor(index).astype(np.int64), tensors[index]


def one_conv():
    inputs = keras.Input((6, 6, 3))
    return keras.Model(inputs, L.Conv2D(5, 3, name="conv")(inputs))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_weight_width_exports_its_trained_levels(bits, per_channel):
    rng = np.random.default_rng(0)
    qat = kq.convert_quant_network(
        one_conv(),
        num_bits=(bits, 8),
        per_channel=[per_channel, False],
        symmetric=[True, False],
        narrow_range=[True, False],
    )
    fit(qat, images(rng), np.zeros((32, 4, 4, 5), "float32"), steps=1)
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
    rng = np.random.default_rng(0)
    qat = kq.convert_quant_network(
        one_conv(), num_bits=(bits, 8), per_channel=[per_channel, False], range_learning=True
    )
    x = images(rng)
    qat.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    for _ in range(3):  # the steps move away from the kernel's own range
        qat.train_on_batch(x, rng.normal(size=(32, 4, 4, 5)).astype("float32"))
    quantizer = qat.get_layer("conv").weight_quantizer
    step = quantizer.step_for(qat.get_layer("conv").kernel()).numpy()
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
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    rng = np.random.default_rng(0)
    qat = kq.convert_quant_network(
        three_convs(), num_bits=(4, 8), layer_num_bits={"first": (8, None), "last": 8}
    )
    fit(qat, images(rng), np.zeros((32, 2, 2, 2), "float32"), steps=1)
    tflite_bytes = kq.export_tflite(qat)
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


def test_int16_export_refuses_an_embedding_whose_int8_table_meets_activations():
    # A layer norm's gamma and beta take 16 bits instead (test_layer_norm.py).
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(12, 8, name="quantized")(inputs)
    data = np.random.default_rng(0).integers(0, 12, (16, 5)).astype("int32")
    x = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x))
    qat = kq.convert_quant_network(
        keras.Model(inputs, x), num_bits=[8, 16], symmetric=True, narrow_range=True
    )
    qat(data, training=True)
    with pytest.raises(ValueError, match=r"'quantized' \(Quant\w+\): its int8 weights are an"):
        kq.check_exportable(qat, activations="int16")


def four_bit_model(kind):
    rng = np.random.default_rng(0)
    if kind == "embedding":
        inputs = keras.Input((5,), dtype="int32")
        x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(12, 8)(inputs))
        return inputs, x, rng.integers(0, 12, (32, 5)).astype("int32")
    if kind == "layer_norm":
        inputs = keras.Input((5, 8))
        x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(inputs))
        return inputs, x, rng.normal(size=(32, 5, 8)).astype("float32")
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(inputs)
    return inputs, keras.layers.Flatten()(x), rng.normal(size=(32, 4, 4, 3)).astype("float32")


@pytest.mark.parametrize("kind", ["embedding", "layer_norm", "conv2d_transpose"])
def test_four_bit_weights_without_an_int4_kernel_export_as_int8_levels(kind):
    inputs, x, data = four_bit_model(kind)
    qat = kq.convert_quant_network(keras.Model(inputs, keras.layers.Dense(3)(x)), num_bits=(4, 8))
    qat(data, training=True)
    tflite_bytes = kq.export_tflite(qat)  # pack_int4=True: the Dense is INT4, the rest int8
    interpreter = tflite_interpreter(tflite_bytes, allocate=False)
    types = {t["dtype"] for t in interpreter.get_tensor_details()}
    assert np.int8 in types
    # The INT4 Dense after it requantizes in fixed point: up to 2 steps (docs/known-limits.md).
    assert kq.compare_tflite(qat, tflite_bytes, data, tie_steps=4)["max_diff_steps"] <= 2.001
