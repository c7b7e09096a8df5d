import pathlib

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import (
    Conv2DBnAct,
    DenseBnAct,
    FakeQuant,
    QuantConcatenate,
    QuantConv2DBnAct,
    QuantDenseBnAct,
    convert_quant_network,
)
from keras_qat.quantizers import nudged_range, quant_range


def lenet():
    return keras.Sequential(
        [
            keras.Input((12, 12, 1), name="image"),
            Conv2DBnAct(4, 3, has_bn=True, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.0),  # cloned, and deterministic
            DenseBnAct(8, activation="relu6"),
            DenseBnAct(3),
        ]
    )


def branchy():
    inputs = keras.Input((8, 8, 3))
    a = Conv2DBnAct(4, 3, padding="same", activation="relu")(inputs)
    b = Conv2DBnAct(4, 1, has_bn=True)(inputs)
    merged = keras.layers.Add()([a, b])
    merged = keras.layers.ReLU()(merged)
    merged = keras.layers.Concatenate()([merged, a])
    pooled = keras.layers.GlobalAveragePooling2D()(merged)
    return keras.Model(inputs, DenseBnAct(2)(pooled))


def train(model, x, y, steps, **compile_kwargs):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", **compile_kwargs)
    for _ in range(steps):
        model.train_on_batch(x, y)


def test_sequential_layout():
    qat_model = convert_quant_network(lenet(), per_channel=[True, False])
    assert (
        not isinstance(qat_model, keras.Sequential) and not qat_model.compiled
    )  # one Functional path
    assert [type(layer).__name__ for layer in qat_model.layers] == [
        "InputLayer",
        "FakeQuant",
        "QuantConv2DBnFoldAct",
        "FakeQuant",
        "MaxPooling2D",
        "Flatten",
        "Dropout",
        "QuantDenseBnAct",
        "FakeQuant",
        "QuantDenseBnAct",
        "FakeQuant",
    ]
    assert qat_model.layers[1].name == "image_quant"
    assert qat_model.layers[2].weight_quantizer.per_channel and not qat_model.layers[3].per_channel


def consumers(qat_model):
    """Layer name -> classes of the layers that consume its output."""
    follows = {}
    for layer in qat_model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                follows.setdefault(tensor._keras_history.operation.name, []).append(type(layer))
    return follows


def consumers_of(layer):
    """Names of the layers whose outputs `layer` consumes."""
    return [
        tensor._keras_history.operation.name
        for node in layer._inbound_nodes
        for tensor in node.input_tensors
    ]


def test_functional_layout_puts_fake_quant_after_merges():
    model = branchy()
    model.compile("adam", "mse")
    qat_model = convert_quant_network(model)
    assert not qat_model.compiled
    follows = consumers(qat_model)
    for layer in qat_model.layers:
        if isinstance(
            layer,
            (
                QuantConv2DBnAct,
                QuantDenseBnAct,
                keras.layers.GlobalAveragePooling2D,
                keras.layers.InputLayer,
            ),
        ):
            assert follows.get(layer.name) == [FakeQuant], layer.name
    # The Add feeds only a ReLU (fused by integer kernels) and the ReLU only a
    # Concatenate (whose inputs are written on its grid): each rounds once, later.
    add = [layer for layer in qat_model.layers if isinstance(layer, keras.layers.Add)][0]
    relu = [layer for layer in qat_model.layers if isinstance(layer, keras.layers.ReLU)][0]
    assert follows[add.name] == [keras.layers.ReLU]
    assert follows[relu.name] == [QuantConcatenate]
    # The concatenation quantizes itself with one shared range: the ReLU output
    # on it, and the conv output (already quantized, used by the Add too) not again.
    concat = [layer for layer in qat_model.layers if isinstance(layer, QuantConcatenate)][0]
    assert follows[concat.name] == [keras.layers.GlobalAveragePooling2D]
    assert concat.quantize_inputs == [True, False]
    # input, 2 convs, pooling, dense
    assert sum(isinstance(layer, FakeQuant) for layer in qat_model.layers) == 5


@pytest.mark.parametrize(
    "activation, fused",
    [
        (keras.layers.ReLU(), True),
        (keras.layers.ReLU(max_value=6.0), True),
        (keras.layers.Activation("relu6"), True),
        (keras.layers.ReLU(negative_slope=0.1), False),
        (keras.layers.Activation("sigmoid"), False),
    ],
)
def test_only_relu_and_relu6_fuse_into_a_merge(activation, fused):
    inputs = keras.Input((6,))
    a, b = DenseBnAct(4)(inputs), DenseBnAct(4)(inputs)
    merged = keras.layers.Multiply()([a, b])
    qat_model = convert_quant_network(keras.Model(inputs, activation(merged)))
    multiply = [layer for layer in qat_model.layers if isinstance(layer, keras.layers.Multiply)][0]
    # The merge is not rounded on a grid of its own: a fused activation is a
    # clamp of the one rounding, which the FakeQuant after it applies.
    (quantizer,) = [layer for layer in qat_model.layers if multiply.name in consumers_of(layer)]
    assert isinstance(quantizer, FakeQuant)
    assert (quantizer.activation is not None) == fused
    assert any(type(layer) is type(activation) for layer in qat_model.layers) == (not fused)


@pytest.mark.parametrize("bn_fold", [False, True])
@pytest.mark.parametrize("build", [lenet, branchy])
def test_delayed_quantization_gives_the_float_outputs(build, bn_fold):
    model = build()
    shape = (16,) + tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    y = (
        np.random.default_rng(1)
        .standard_normal((16,) + tuple(model.outputs[0].shape[1:]))
        .astype("float32")
    )
    float_model = keras.models.clone_model(model)
    float_model.set_weights(model.get_weights())
    qat_model = convert_quant_network(model, quant_delay=100, bn_fold=bn_fold)
    if bn_fold:  # folding rearranges the float arithmetic: equal to float tolerance
        np.testing.assert_allclose(
            qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
        )
    else:  # exactly the float model's computation
        np.testing.assert_array_equal(qat_model.predict(x, verbose=0), model.predict(x, verbose=0))
    train(float_model, x, y, 3)
    train(qat_model, x, y, 3)
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), float_model.predict(x, verbose=0), rtol=1e-4, atol=1e-5
    )


def on_grid(values, layer):
    lo, hi = quant_range(layer.min.numpy(), layer.max.numpy(), layer.symmetric)
    nudged_min, _, scale = (
        t.numpy() for t in nudged_range(lo, hi, layer.num_bits, layer.narrow_range)
    )
    levels = (values - nudged_min) / scale
    return (
        np.allclose(levels, np.round(levels), atol=1e-3)
        and levels.min() > -1e-3
        and levels.max() < 2**layer.num_bits - 1 + 1e-3
    )


@pytest.mark.parametrize("build", [lenet, branchy])
def test_outputs_lie_on_the_grid_after_the_delay(build):
    model = build()
    x = (
        np.random.default_rng(0)
        .standard_normal((16,) + tuple(model.inputs[0].shape[1:]))
        .astype("float32")
    )
    y = np.zeros((16,) + tuple(model.outputs[0].shape[1:]), "float32")
    qat_model = convert_quant_network(model, quant_delay=2, num_bits=(4, 4))
    train(qat_model, x, y, 3)
    fake_quants = [layer for layer in qat_model.layers if isinstance(layer, FakeQuant)]
    assert all(layer.step.numpy() == 3 for layer in fake_quants)
    # A FakeQuant that feeds a quantized layer also outputs its grid.
    outputs = [
        layer.output[0] if isinstance(layer.output, (list, tuple)) else layer.output
        for layer in fake_quants
    ]
    probe = keras.Model(qat_model.inputs, outputs)
    for layer, values in zip(fake_quants, probe.predict(x, verbose=0)):
        assert on_grid(values, layer), layer.name
        assert len(np.unique(values)) <= 16


def test_the_same_model_converts_twice_and_weights_are_copies():
    model = branchy()
    first = convert_quant_network(model)
    second = convert_quant_network(model, num_bits=4)
    assert first.count_params() == second.count_params()
    q_conv = [layer for layer in first.layers if isinstance(layer, QuantConv2DBnAct)][0]
    f_conv = model.get_layer(q_conv.name)
    np.testing.assert_array_equal(q_conv.conv.kernel, f_conv.conv.kernel)
    q_conv.conv.kernel.assign(q_conv.conv.kernel + 1.0)
    assert not np.array_equal(q_conv.conv.kernel, f_conv.conv.kernel)


def test_unsupported_layers_are_listed_together():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.UnitNormalization(name="unit_norm")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.BatchNormalization(name="flat_bn")(x)  # 2D, after no Dense: no integer kernel
    x = keras.layers.LayerNormalization(rms_scaling=True, name="layer_norm")(x)
    outputs = keras.layers.Dense(2)(x)
    with pytest.raises(ValueError) as error:
        convert_quant_network(keras.Model(inputs, outputs))
    message = str(error.value)
    for part in [
        "'unit_norm' (UnitNormalization)",
        "'flat_bn' (BatchNormalization)",
        "'layer_norm' (LayerNormalization: rms_scaling=True",
        "skip_layers",
    ]:
        assert part in message


def supported_class_names():
    from keras_qat import int8_rules
    from keras_qat.layers.quantized import QUANTIZED_FORMS
    from keras_qat.transforms import support
    from keras_qat.transforms.fuse import fusable_classes

    tables = (
        tuple(fusable_classes()),
        tuple(QUANTIZED_FORMS),
        tuple(d.layer_class for d in support.DECOMPOSITIONS),
        support.QUANTIZED_KERAS_LAYERS,
        int8_rules.ROUNDING_LAYERS,
        int8_rules.SHARED_GRID_LAYERS,
        int8_rules.GRID_KEEPING_LAYERS,
        int8_rules.ROUNDING_OPERATIONS,
        int8_rules.GRID_KEEPING_OPERATIONS,
    )
    return {c.__name__ for table in tables for c in table}


def test_the_refusal_message_lists_every_supported_class_from_the_tables():
    inputs = keras.Input((4,))
    outputs = keras.layers.UnitNormalization(name="unit_norm")(inputs)
    with pytest.raises(ValueError) as error:
        convert_quant_network(keras.Model(inputs, outputs))
    supported = str(error.value).split("Supported: ", 1)[1]
    missing = [name for name in supported_class_names() if name not in supported]
    assert missing == []


def test_docs_list_every_supported_class():
    text = (pathlib.Path(__file__).parents[1] / "docs" / "conversion.md").read_text()
    missing = sorted(name for name in supported_class_names() if name not in text)
    assert missing == []


def test_subclassed_model_is_rejected_with_advice():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = DenseBnAct(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="Net.*Functional"):
        convert_quant_network(net)


def test_unbuilt_sequential_is_rejected():
    with pytest.raises(ValueError, match="input shape"):
        convert_quant_network(keras.Sequential([DenseBnAct(2)]))


def test_converting_a_quantization_network_again_is_refused():
    inputs = keras.Input((4,))
    qat_model = convert_quant_network(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    with pytest.raises(ValueError, match="already a quantization network"):
        convert_quant_network(qat_model)


@pytest.mark.parametrize(
    "layer, match",
    [
        (keras.layers.Conv2D(4, 3, data_format="channels_first"), "data_format='channels_first'"),
        (keras.layers.Dense(2, lora_rank=2), "lora_rank=2"),
    ],
    ids=["channels_first", "lora"],
)
def test_an_unsupported_attribute_is_named(layer, match):
    inputs = keras.Input((3, 8, 8) if isinstance(layer, keras.layers.Conv2D) else (4,))
    with pytest.raises(ValueError, match=match):
        convert_quant_network(keras.Model(inputs, layer(inputs)))


def test_pairs_reach_weights_and_activations():
    qat_model = convert_quant_network(
        lenet(),
        num_bits=(4, 6),
        symmetric=(True, False),
        narrow_range=(True, False),
        quant_delay=(3, 5),
    )
    conv, act = qat_model.layers[2].weight_quantizer, qat_model.layers[3]
    assert (conv.num_bits, conv.symmetric, conv.narrow_range, conv.quant_delay) == (
        4,
        True,
        True,
        3,
    )
    assert (act.num_bits, act.symmetric, act.narrow_range, act.quant_delay) == (6, False, False, 5)


def test_average_pooling_shares_its_input_range_unless_the_input_is_used_elsewhere():
    inputs = keras.Input((8, 8, 3))
    a = Conv2DBnAct(4, 3, padding="same", name="only_pooled")(inputs)
    a = keras.layers.AveragePooling2D(2, name="pool_a")(a)
    b = Conv2DBnAct(4, 3, padding="same", name="also_added")(inputs)
    pooled_b = keras.layers.AveragePooling2D(2, name="pool_b")(b)
    c = keras.layers.Add()([keras.layers.MaxPooling2D(2)(b), pooled_b, a])
    qat_model = convert_quant_network(keras.Model(inputs, c))
    names = {layer.name for layer in qat_model.layers}
    assert (
        type(qat_model.get_layer("pool_a")).__name__ == "QuantAveragePooling2D"
        and "only_pooled_quant" not in names
    )
    assert (
        type(qat_model.get_layer("pool_b")) is keras.layers.AveragePooling2D
        and "also_added_quant" in names
    )


def test_softmax_and_sigmoid_layers_get_the_fixed_int8_ranges():
    inputs = keras.Input((6,))
    x = DenseBnAct(4)(inputs)
    probabilities = keras.layers.Softmax(name="probabilities")(x)
    gate = keras.layers.Activation("sigmoid", name="gate")(x)
    qat_model = convert_quant_network(keras.Model(inputs, [probabilities, gate]))
    assert qat_model.get_layer("probabilities_quant").fixed_range == (0.0, 255 / 256)
    assert qat_model.get_layer("gate_quant").fixed_range == (0.0, 255 / 256)


def test_integer_image_input_is_quantized_after_its_rescaling():
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    qat_model = convert_quant_network(model)
    kinds = [type(layer).__name__ for layer in qat_model.layers[:4]]
    assert kinds == ["InputLayer", "Rescaling", "FakeQuant", "QuantConv2DBnAct"]
    x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3)).astype("uint8")
    train(qat_model, x, np.zeros((32, 2)), 2)
    assert qat_model.layers[2].max.numpy() > 0.9


def _conv_dense_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Dense(5, name="dense")(keras.layers.Flatten()(x))
    return keras.Model(inputs, x)


def test_default_options_are_tflites_int8_scheme_and_export():
    qat_model = convert_quant_network(_conv_dense_model())
    conv, dense = (
        qat_model.get_layer("conv").weight_quantizer,
        qat_model.get_layer("dense").weight_quantizer,
    )
    assert (conv.symmetric, conv.narrow_range, conv.per_channel) == (True, True, True)
    assert (dense.symmetric, dense.narrow_range, dense.per_channel) == (True, True, False)
    activations = [layer for layer in qat_model.layers if isinstance(layer, FakeQuant)]
    assert all(not (q.symmetric or q.narrow_range or q.per_channel) for q in activations)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 3)).astype("float32")
    qat_model.compile(optimizer="sgd", loss="mse")
    qat_model.fit(x, np.zeros((16, 5)), verbose=0)
    report = kq.compare_tflite(qat_model, kq.export_tflite(qat_model), x)
    assert report["within_one_step"] == 1.0, report


def test_mindspores_example_call_means_what_it_means_in_mindspore():
    qat_model = convert_quant_network(
        _conv_dense_model(),
        quant_delay=900,
        bn_fold=False,
        per_channel=[True, False],
        symmetric=[False, False],
    )
    for name in ("conv", "dense"):
        quantizer = qat_model.get_layer(name).weight_quantizer
        assert (quantizer.symmetric, quantizer.narrow_range, quantizer.per_channel) == (
            False,
            False,
            True,
        )
        assert quantizer.quant_delay == 900


def test_per_tensor_dense_weights_become_per_channel_before_an_unfolded_batchnorm():
    inputs = keras.Input((6,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(4, name="dense")(inputs))
    qat_model = convert_quant_network(keras.Model(inputs, x), bn_fold=False)
    assert qat_model.get_layer("dense").weight_quantizer.per_channel
    qat_model = convert_quant_network(keras.Model(inputs, x))  # folded: per tensor is exact
    assert not qat_model.get_layer("dense").weight_quantizer.per_channel


def test_names_of_a_model_from_another_process_are_not_reused():
    # A model loaded from a file holds names ("reshape", "dense_2") that this
    # process's automatic naming has not counted; the attention rewrite adds
    # unnamed reshapes, which Keras named "reshape" beside the model's own.
    keras.backend.clear_session()  # as in a new process
    inputs = keras.Input((4, 8))
    x = keras.layers.Reshape((4, 8), name="reshape")(inputs)
    x = keras.layers.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = keras.layers.Dense(3, name="dense_2")(keras.layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, x)
    qat_model = convert_quant_network(model, quant_delay=10**6)
    names = [layer.name for layer in qat_model.layers]
    assert len(names) == len(set(names))
    sample = np.random.default_rng(0).standard_normal((2, 4, 8)).astype("float32")
    np.testing.assert_allclose(qat_model(sample), model(sample), rtol=1e-5, atol=1e-5)
