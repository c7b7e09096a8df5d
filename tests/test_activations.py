"""Two-op activations (QuantSwish, QuantHardSigmoid): their intermediate grid
is a FakeQuant built from the conversion's activation options."""

import keras
import numpy as np
import pytest

import keras_qat as kq


def swish_model():
    inputs = keras.Input((6,), name="x")
    x = keras.layers.Activation("swish", name="act")(inputs)  # after no layer it fuses into
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_swish_rounds_its_sigmoid_to_the_fixed_grid():
    x = np.linspace(-4, 4, 41).astype("float32")
    sigmoid = 1 / (1 + np.exp(-x.astype("float64")))
    levels = np.clip(np.round(sigmoid * 256), 0, 255) / 256  # scale 1/256, zero point 0
    np.testing.assert_allclose(kq.QuantSwish()(x).numpy(), x * levels, atol=1e-6)


def test_hard_sigmoid_rounds_relu6_to_the_grid_of_0_to_6():
    x = np.linspace(-4, 4, 41).astype("float32")
    relu6 = np.clip(x + 3.0, 0, 6)
    levels = np.floor(relu6 / (6 / 255) + 0.5) * (6 / 255)  # ties up, as TensorFlow's fake quant
    np.testing.assert_allclose(kq.QuantHardSigmoid()(x).numpy(), levels / 6, atol=1e-6)


def test_conversion_gives_the_intermediate_grid_the_layers_activation_options():
    qat_model = kq.convert_quant_network(
        swish_model(), layer_num_bits={"act": (None, 6)}, symmetric=(True, True), quant_delay=3
    )
    quantizer = qat_model.get_layer("act").quantizer
    assert (quantizer.num_bits, quantizer.symmetric, quantizer.quant_delay) == (6, True, 3)
    assert quantizer.fixed_range == (0.0, 255 / 256)


def test_a_shared_two_op_activation_counts_its_calls_per_step():
    inputs = keras.Input((4,))
    act = keras.layers.Activation("hard_sigmoid", name="act")
    x = act(inputs)
    outputs = act(keras.layers.Add()([x, inputs]))
    qat_model = kq.convert_quant_network(keras.Model(inputs, outputs))
    assert qat_model.get_layer("act").quantizer.calls_per_step == 2


def test_quantizer_options_round_trip_through_the_config():
    layer = kq.QuantSwish(quantizer=dict(num_bits=7, quant_delay=4), name="swish")
    restored = kq.QuantSwish.from_config(layer.get_config())
    assert (restored.quantizer.num_bits, restored.quantizer.quant_delay) == (7, 4)
    assert restored.quantizer.fixed_range == (0.0, 255 / 256)


def test_configs_of_version_0_2_dev_still_load():
    config = {"name": "hs", "trainable": True, "dtype": "float32", "num_bits": 5, "quant_delay": 2}
    layer = kq.QuantHardSigmoid.from_config(config)
    assert (layer.quantizer.num_bits, layer.quantizer.quant_delay) == (5, 2)
    assert layer.quantizer.fixed_range == (0.0, 6.0)


def test_a_quantizer_of_another_range_is_refused():
    with pytest.raises(ValueError, match=r"fixed range \(0.0, 6.0\). Received: quantizer"):
        kq.QuantHardSigmoid(quantizer=kq.FakeQuant(fixed_range=(0.0, 1.0)))
