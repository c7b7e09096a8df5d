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
    qmodel = convert_quant_network(lenet(), per_channel=[True, False])
    assert not isinstance(qmodel, keras.Sequential) and not qmodel.compiled  # one Functional path
    assert [type(layer).__name__ for layer in qmodel.layers] == [
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
    assert qmodel.layers[1].name == "image_quant"
    assert qmodel.layers[2].weight_quantizer.per_channel and not qmodel.layers[3].per_channel


def consumers(qmodel):
    """Layer name -> classes of the layers that consume its output."""
    follows = {}
    for layer in qmodel.layers:
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
    qmodel = convert_quant_network(model)
    assert not qmodel.compiled
    follows = consumers(qmodel)
    for layer in qmodel.layers:
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
    add = [layer for layer in qmodel.layers if isinstance(layer, keras.layers.Add)][0]
    relu = [layer for layer in qmodel.layers if isinstance(layer, keras.layers.ReLU)][0]
    assert follows[add.name] == [keras.layers.ReLU]
    assert follows[relu.name] == [QuantConcatenate]
    # The concatenation quantizes itself with one shared range: the ReLU output
    # on it, and the conv output (already quantized, used by the Add too) not again.
    concat = [layer for layer in qmodel.layers if isinstance(layer, QuantConcatenate)][0]
    assert follows[concat.name] == [keras.layers.GlobalAveragePooling2D]
    assert concat.quantize_inputs == [True, False]
    # input, 2 convs, pooling, dense
    assert sum(isinstance(layer, FakeQuant) for layer in qmodel.layers) == 5


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
    qmodel = convert_quant_network(keras.Model(inputs, activation(merged)))
    multiply = [layer for layer in qmodel.layers if isinstance(layer, keras.layers.Multiply)][0]
    # The merge is not rounded on a grid of its own: a fused activation is a
    # clamp of the one rounding, which the FakeQuant after it applies.
    (quantizer,) = [layer for layer in qmodel.layers if multiply.name in consumers_of(layer)]
    assert isinstance(quantizer, FakeQuant)
    assert (quantizer.activation is not None) == fused
    assert any(type(layer) is type(activation) for layer in qmodel.layers) == (not fused)


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
    qmodel = convert_quant_network(model, quant_delay=100, bn_fold=bn_fold)
    if bn_fold:  # folding rearranges the float arithmetic: equal to float tolerance
        np.testing.assert_allclose(
            qmodel.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
        )
    else:  # exactly the float model's computation
        np.testing.assert_array_equal(qmodel.predict(x, verbose=0), model.predict(x, verbose=0))
    train(float_model, x, y, 3)
    train(qmodel, x, y, 3)
    np.testing.assert_allclose(
        qmodel.predict(x, verbose=0), float_model.predict(x, verbose=0), rtol=1e-4, atol=1e-5
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
    qmodel = convert_quant_network(model, quant_delay=2, num_bits=(4, 4))
    train(qmodel, x, y, 3)
    fake_quants = [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]
    assert all(layer.step.numpy() == 3 for layer in fake_quants)
    # A FakeQuant that feeds a quantized layer also outputs its grid.
    outputs = [
        layer.output[0] if isinstance(layer.output, (list, tuple)) else layer.output
        for layer in fake_quants
    ]
    probe = keras.Model(qmodel.inputs, outputs)
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


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_bits=(8, 8, 8)), "num_bits"),
        (dict(num_bits="8"), "num_bits"),
        (dict(num_bits=(1, 8)), "num_bits"),
        (dict(num_bits=(8, 17)), "num_bits"),
        (dict(quant_delay=-1), "quant_delay"),
        (dict(quant_delay=(0, -5)), "quant_delay"),
        (dict(per_channel=(True, True)), "per_channel"),
        (dict(per_channel=True), "per_channel"),
        (dict(symmetric="yes"), "symmetric"),
        (dict(narrow_range=[True]), "narrow_range"),
        (dict(freeze_bn=-3), "freeze_bn"),
        (dict(bn_fold="no"), "bn_fold"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        convert_quant_network(lenet(), **kwargs)


def test_pairs_reach_weights_and_activations():
    qmodel = convert_quant_network(
        lenet(),
        num_bits=(4, 6),
        symmetric=(True, False),
        narrow_range=(True, False),
        quant_delay=(3, 5),
    )
    conv, act = qmodel.layers[2].weight_quantizer, qmodel.layers[3]
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
    qmodel = convert_quant_network(keras.Model(inputs, c))
    names = {layer.name for layer in qmodel.layers}
    assert (
        type(qmodel.get_layer("pool_a")).__name__ == "QuantAveragePooling2D"
        and "only_pooled_quant" not in names
    )
    assert (
        type(qmodel.get_layer("pool_b")) is keras.layers.AveragePooling2D
        and "also_added_quant" in names
    )


def test_softmax_and_sigmoid_layers_get_the_fixed_int8_ranges():
    inputs = keras.Input((6,))
    x = DenseBnAct(4)(inputs)
    probabilities = keras.layers.Softmax(name="probabilities")(x)
    gate = keras.layers.Activation("sigmoid", name="gate")(x)
    qmodel = convert_quant_network(keras.Model(inputs, [probabilities, gate]))
    assert qmodel.get_layer("probabilities_quant").fixed_range == (0.0, 255 / 256)
    assert qmodel.get_layer("gate_quant").fixed_range == (0.0, 255 / 256)


def _conv_dense_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Dense(5, name="dense")(keras.layers.Flatten()(x))
    return keras.Model(inputs, x)


def test_default_options_are_tflites_int8_scheme_and_export():
    qmodel = convert_quant_network(_conv_dense_model())
    conv, dense = (
        qmodel.get_layer("conv").weight_quantizer,
        qmodel.get_layer("dense").weight_quantizer,
    )
    assert (conv.symmetric, conv.narrow_range, conv.per_channel) == (True, True, True)
    assert (dense.symmetric, dense.narrow_range, dense.per_channel) == (True, True, False)
    activations = [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]
    assert all(not (q.symmetric or q.narrow_range or q.per_channel) for q in activations)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 3)).astype("float32")
    qmodel.compile(optimizer="sgd", loss="mse")
    qmodel.fit(x, np.zeros((16, 5)), verbose=0)
    report = kq.compare_tflite(qmodel, kq.export_tflite(qmodel), x)
    assert report["within_one_step"] == 1.0, report


def test_mindspores_example_call_means_what_it_means_in_mindspore():
    qmodel = convert_quant_network(
        _conv_dense_model(),
        quant_delay=900,
        bn_fold=False,
        per_channel=[True, False],
        symmetric=[False, False],
    )
    for name in ("conv", "dense"):
        quantizer = qmodel.get_layer(name).weight_quantizer
        assert (quantizer.symmetric, quantizer.narrow_range, quantizer.per_channel) == (
            False,
            False,
            True,
        )
        assert quantizer.quant_delay == 900


def test_per_tensor_dense_weights_become_per_channel_before_an_unfolded_batchnorm():
    inputs = keras.Input((6,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(4, name="dense")(inputs))
    qmodel = convert_quant_network(keras.Model(inputs, x), bn_fold=False)
    assert qmodel.get_layer("dense").weight_quantizer.per_channel
    qmodel = convert_quant_network(keras.Model(inputs, x))  # folded: per tensor is exact
    assert not qmodel.get_layer("dense").weight_quantizer.per_channel
