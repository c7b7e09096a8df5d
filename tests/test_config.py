"""Arguments are checked where they are given: a bad value is a ValueError
in Keras' style that names the argument and ends in "Received: name=value"
(keras_qat/config.py), and numpy scalars are accepted where Python ones are.
Options of `convert_quant_network`, of the quantizer layers, of the
`fake_quant` op and of `export_tflite`."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_qat as kq

L = keras.layers


def ends_with(received):
    """A `pytest.raises` pattern: the message ends in `received`, verbatim."""
    return re.escape(received) + "$"


def names_argument(received):
    """A `pytest.raises` pattern: the message names the argument in
    backticks, and ends in `received` ("Received: name=value")."""
    name = received.removeprefix("Received: ").split("=")[0]
    return re.escape(f"`{name}`") + ".*" + ends_with(received)


def small_model():
    inputs = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Flatten()(L.ReLU(name="relu")(x))
    return keras.Model(inputs, L.Dense(2, name="dense")(x))


# 1. convert_quant_network's options. A pair option is `(weights,
# activations)`; a single value applies to both, and the message names the
# element of the pair that is wrong.


@pytest.mark.parametrize(
    "kwargs, received",
    [
        (dict(num_bits=(8, 8, 8)), "Received: num_bits=(8, 8, 8)"),
        (dict(num_bits="8"), "Received: num_bits[0] (weights)='8'"),
        (dict(num_bits=(1, 8)), "Received: num_bits[0] (weights)=1"),
        (dict(num_bits=(8, 17)), "Received: num_bits[1] (activations)=17"),
        (dict(quant_delay=-1), "Received: quant_delay[0] (weights)=-1"),
        (dict(quant_delay=(0, -5)), "Received: quant_delay[1] (activations)=-5"),
        (dict(quant_delay=2.0), "Received: quant_delay[0] (weights)=2.0"),
        (dict(per_channel=True), "Received: per_channel=(True, True)"),
        (dict(per_channel=(True, True)), "Received: per_channel=(True, True)"),
        (dict(symmetric="yes"), "Received: symmetric[0] (weights)='yes'"),
        (dict(narrow_range=[True]), "Received: narrow_range=[True]"),
        (dict(freeze_bn=-3), "Received: freeze_bn=-3"),
        (dict(bn_fold="no"), "Received: bn_fold='no'"),
        (dict(skip_layers=3), "Received: skip_layers=3"),
    ],
)
def test_an_invalid_conversion_option_is_named_with_the_value_received(kwargs, received):
    with pytest.raises(ValueError, match=names_argument(received)):
        kq.convert_quant_network(small_model(), **kwargs)


def test_activations_cannot_be_quantized_per_channel():
    with pytest.raises(ValueError, match="activations cannot be quantized per channel"):
        kq.convert_quant_network(small_model(), per_channel=[True, True])


def test_skip_layers_takes_a_layers_name_not_the_layer():
    with pytest.raises(ValueError, match=r"pass its name \('head'\) or its class instead"):
        kq.convert_quant_network(small_model(), skip_layers=[L.Dense(2, name="head")])


@pytest.mark.parametrize(
    "layer_num_bits, match",
    [
        ({"nope": 8}, "has no layer named 'nope'"),
        ({"image": (8, None)}, "'image' weights"),  # an input has no weights
        ({"image": 8, "conv": (None, 17)}, re.escape("layer_num_bits['conv'][1] (activations)")),
        (["conv"], "expected a dict"),
    ],
    ids=["unknown_layer", "no_such_quantizer", "invalid_width", "not_a_dict"],
)
def test_an_invalid_layer_num_bits_is_named(layer_num_bits, match):
    with pytest.raises(ValueError, match=match):
        kq.convert_quant_network(small_model(), layer_num_bits=layer_num_bits)


def test_numpy_scalars_are_accepted_where_python_ones_are():
    qat_model = kq.convert_quant_network(
        small_model(), num_bits=np.int64(6), quant_delay=np.int32(2), symmetric=np.bool_(True)
    )
    quantizer = qat_model.get_layer("conv").weight_quantizer
    assert quantizer.num_bits == 6
    assert type(quantizer.quant_delay) is int  # a Python int: the config stays JSON
    assert kq.FakeQuant(ema_decay=np.float32(0.5), axis=np.int64(1)).axis == 1


# 2. The quantizer layers.


@pytest.mark.parametrize(
    "kwargs, received",
    [
        (dict(num_bits=1), "Received: num_bits=1"),
        (dict(ema_decay=1.0), "Received: ema_decay=1.0"),
        (dict(ema_decay="0.9"), "Received: ema_decay='0.9'"),
        (dict(quant_delay=-1), "Received: quant_delay=-1"),
        (dict(symmetric="yes"), "Received: symmetric='yes'"),
        (dict(axis=1.0), "Received: axis=1.0"),  # a float, even a whole one
        (dict(fixed_range=(-np.inf, np.inf)), "Received: fixed_range=(-inf, inf)"),
        (dict(fixed_range=(np.nan, 1.0)), "Received: fixed_range=(nan, 1.0)"),
        (dict(activation="sigmoid"), "Received: activation='sigmoid'"),  # kernels do not fuse it
    ],
)
def test_an_invalid_fake_quant_argument_is_named_with_the_value_received(kwargs, received):
    with pytest.raises(ValueError, match=names_argument(received)):
        kq.FakeQuant(**kwargs)


def test_a_fixed_range_is_one_range_for_the_whole_tensor():
    received = "cannot be used with per_channel=True. Received: per_channel=True"
    with pytest.raises(ValueError, match=ends_with(received)):
        kq.FakeQuant(fixed_range=(0.0, 1.0), per_channel=True)


def test_a_per_channel_fake_quant_needs_its_axis_in_the_input():
    received = "size along `axis` is known. Received: input_shape=(None, 4)"
    with pytest.raises(ValueError, match=ends_with(received)):
        kq.FakeQuant(per_channel=True, axis=3).build((None, 4))


@pytest.mark.parametrize(
    "kwargs, received",
    [
        (dict(num_bits=17), "Received: num_bits=17"),
        (dict(symmetric="yes"), "Received: symmetric='yes'"),
        (dict(narrow_range=1), "Received: narrow_range=1"),
        (dict(per_channel="no"), "Received: per_channel='no'"),
        (dict(quant_delay=-2), "Received: quant_delay=-2"),
        (dict(calls_per_step=0), "Received: calls_per_step=0"),
    ],
)
def test_an_invalid_weight_quantizer_argument_is_named_with_the_value_received(kwargs, received):
    with pytest.raises(ValueError, match=names_argument(received)):
        kq.WeightQuantizer(**kwargs)


# 3. The fake-quant op and the export.


@pytest.mark.parametrize("low, high", [(1.0, -1.0), (np.nan, 1.0), (-1.0, np.inf)])
def test_fake_quant_refuses_a_range_that_is_not_finite_and_ordered(low, high):
    received = f"finite bounds with min_val <= max_val. Received: min_val={low}, max_val={high}"
    with pytest.raises(ValueError, match=ends_with(received)):
        kq.fake_quant(tf.zeros((2,)), low, high)


def test_export_path_must_be_a_path_in_an_existing_directory(tmp_path):
    inputs = keras.Input((4,))
    qat_model = kq.convert_quant_network(keras.Model(inputs, L.Dense(2)(inputs)))
    qat_model.compile(optimizer="sgd", loss="mse")
    qat_model.train_on_batch(np.random.default_rng(0).uniform(-1, 1, (8, 4)), np.zeros((8, 2)))
    with pytest.raises(ValueError, match=names_argument("Received: path=3")):
        kq.export_tflite(qat_model, 3)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=re.escape(f"directory '{missing}' does not exist")):
        kq.export_tflite(qat_model, missing / "m.tflite")
    kq.export_tflite(qat_model, tmp_path / "m.tflite")  # a pathlib.Path
    assert (tmp_path / "m.tflite").stat().st_size > 0


def attention_model():
    inputs = keras.Input((5, 8))
    attended = keras.layers.MultiHeadAttention(2, 4, name="mha")(inputs, inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(attended))


def test_layer_num_bits_names_the_parts_of_a_decomposed_layer():
    qat = kq.convert_quant_network(attention_model(), layer_num_bits={"mha_query": (4, None)})
    assert qat.get_layer("mha_query").weight_quantizer.num_bits == 4
    assert qat.get_layer("mha_key").weight_quantizer.num_bits == 8
    with pytest.raises(ValueError, match=r"give their widths \('mha_query', 'mha_key'"):
        kq.convert_quant_network(attention_model(), layer_num_bits={"mha": 4})


def test_a_width_for_a_skipped_layer_is_refused():
    with pytest.raises(ValueError, match=r"keeps 'head' in float \(`skip_layers`\)"):
        kq.convert_quant_network(
            attention_model(), layer_num_bits={"head": 4}, skip_layers=["head"]
        )
