"""The quantizer contract: every keras-qat layer that quantizes says what it
quantizes (`quantizers()`), and the tools ask it instead of keeping lists
of classes."""

import inspect

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat import graph, quantizer_roles
from keras_qat.layers.quantized import QUANTIZED_FORMS
from keras_qat.layers.quantizer import Quantizer
from keras_qat.sensitivity import quantizer_groups

# (constructor arguments, input shape) of each fusion layer kind.
FUSION_ARGS = {
    kq.Conv2DBnAct: ((4, 3), (1, 6, 6, 3)),
    kq.DenseBnAct: ((4,), (2, 3)),
    kq.DepthwiseConv2DBnAct: ((3,), (1, 6, 6, 3)),
    kq.Conv1DBnAct: ((4, 3), (1, 8, 3)),
    kq.DepthwiseConv1DBnAct: ((3,), (1, 8, 3)),
    kq.Conv2DTransposeBnAct: ((4, 3), (1, 4, 4, 3)),
}


def fusion_cases():
    for float_class, (args, shape) in FUSION_ARGS.items():
        plain, folded = QUANTIZED_FORMS[float_class]
        yield (lambda c=float_class, a=args: c(*a)), shape
        yield (lambda c=plain, a=args: c(*a)), shape
        yield (lambda c=folded, a=args: c(*a, has_bn=True)), shape


def other_cases():
    scores = (1, 1, 3, 3)
    return [
        (lambda: kq.FakeQuant(), (2, 3)),
        (lambda: kq.LearnedFakeQuant(), (2, 3)),
        (lambda: kq.QuantEmbedding(10, 4), (2, 3)),
        (lambda: kq.QuantLayerNormalization(), (2, 3, 4)),
        (lambda: kq.QuantLayerNormalization(scale=False), (2, 3, 4)),
        (lambda: kq.QuantConcatenate(), [(2, 3), (2, 2)]),
        (lambda: kq.QuantAveragePooling2D(2), (1, 4, 4, 2)),
        (lambda: kq.QuantAveragePooling1D(2), (1, 6, 2)),
        (lambda: kq.QuantSwish(), (2, 3)),
        (lambda: kq.QuantHardSigmoid(), (2, 3)),
        (lambda: kq.AttentionScoreMask(causal=True), scores),
        (lambda: kq.AttentionWeightMask(causal=True), scores),
        (lambda: kq.QuantAttentionScoreMask(causal=True), scores),
        (lambda: kq.QuantUpSampling2D(interpolation="bilinear"), (1, 2, 2, 1)),
        (lambda: kq.QuantResizing(4, 4), (1, 2, 2, 1)),
        (lambda: kq.WeightOperand((1, 3)), (2, 3)),
        (lambda: kq.BatchBroadcast(), [(1, 1, 3), (2, 5, 3)]),
    ]


CASES = list(fusion_cases()) + other_cases()


def built(make, shape):
    layer = make()
    layer.build(shape)
    return layer


def test_every_public_layer_class_is_covered_here():
    public = {
        obj
        for obj in (getattr(kq, name) for name in kq.__all__)
        if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer)
    }
    covered = {type(make()) for make, _ in CASES} | {kq.WeightQuantizer, kq.LearnedWeightQuantizer}
    assert public - covered == set()


@pytest.mark.parametrize("make, shape", CASES)
def test_a_layer_declares_every_quantizer_it_holds(make, shape):
    layer = built(make, shape)
    held = {id(q) for q in graph.all_layers(layer) if isinstance(q, Quantizer)}
    if isinstance(layer, Quantizer):
        held.add(id(layer))
    declared = quantizer_roles.quantizers_of(layer)
    assert {id(q) for q in declared.values()} == held
    assert all(quantizer_roles.kind(role) in quantizer_roles.KINDS for role in declared)


@pytest.mark.parametrize("make, shape", CASES)
def test_a_layer_gives_the_weights_of_each_weight_role(make, shape):
    layer = built(make, shape)
    roles = quantizer_roles.quantizers_of(layer)
    weight_roles = {r for r in roles if quantizer_roles.kind(r) == quantizer_roles.WEIGHTS}
    weights = layer.quantized_weights() if weight_roles else {}
    assert set(weights) == weight_roles
    for role, values in weights.items():
        quantized = roles[role].quantize_weights(values).values
        assert quantized.shape == values.shape


def test_folded_kernel_is_the_kernel_times_gamma_over_sigma():
    layer = built(lambda: kq.QuantConv2DBnFoldAct(4, 3, has_bn=True), (1, 6, 6, 3))
    rng = np.random.default_rng(0)
    gamma, variance = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    layer.bn.gamma.assign(gamma)
    layer.bn.moving_variance.assign(variance)
    expected = layer.conv.kernel.numpy() * gamma / np.sqrt(variance + layer.bn.epsilon)
    np.testing.assert_allclose(layer.quantized_kernel().numpy(), expected, rtol=1e-6)


def text_model():
    ids = keras.Input((5,), dtype="int32", name="ids")
    x = keras.layers.Embedding(12, 8, name="emb")(ids)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(ids, keras.layers.Dense(3, name="head")(x))


def trained(qat_model, steps=2):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 12, (16, 5)).astype("int32")
    qat_model.compile(optimizer="sgd", loss="mse")
    qat_model.fit(x, rng.standard_normal((16, 3)), batch_size=8, epochs=steps, verbose=0)
    return qat_model


def test_model_quantizers_lists_embedding_and_layer_norm_weights():
    qat_model = kq.convert_quant_network(text_model())
    roles = {(layer.name, role) for layer, role, _ in quantizer_roles.model_quantizers(qat_model)}
    assert {("emb", "weights/embeddings"), ("norm", "weights/gamma"), ("norm", "weights/beta")} <= (
        roles
    )


def test_check_exportable_refuses_wide_embedding_and_layer_norm_weights():
    qat_model = kq.convert_quant_network(
        text_model(), layer_num_bits={"emb": (9, None), "norm": (9, None)}
    )
    with pytest.raises(ValueError) as error:
        kq.check_exportable(trained(qat_model))
    message = str(error.value)
    assert "'emb' (QuantEmbedding) has 9-bit weights" in message
    assert "'norm' (QuantLayerNormalization, weights/gamma) has 9-bit weights" in message
    assert "'norm' (QuantLayerNormalization, weights/beta) has 9-bit weights" in message
    assert "'head'" not in message


def test_check_exportable_refuses_embedding_and_layer_norm_weights_in_their_delay():
    qat_model = trained(kq.convert_quant_network(text_model(), quant_delay=(5, 0)))
    with pytest.raises(ValueError) as error:
        kq.check_exportable(qat_model)
    message = str(error.value)
    assert "'emb' (QuantEmbedding) is still in its quant delay (4 of 5 steps)" in message
    assert "'norm' (QuantLayerNormalization, weights/gamma) is still in its quant delay" in message


def test_quant_report_has_rows_for_embedding_and_layer_norm_weights():
    qat_model = trained(kq.convert_quant_network(text_model()))
    x = np.random.default_rng(1).integers(0, 12, (8, 5)).astype("int32")
    rows = {row["tensor"]: row for row in kq.quant_report(qat_model, x).rows}
    table = qat_model.get_layer("emb").embeddings.numpy()
    assert rows["emb/embeddings"]["kind"] == "weights"
    np.testing.assert_allclose(rows["emb/embeddings"]["max"], np.abs(table).max(), rtol=1e-6)
    gamma = qat_model.get_layer("norm").gamma.numpy()
    np.testing.assert_allclose(rows["norm/gamma"]["max"], np.abs(gamma).max(), rtol=1e-6)
    assert "norm/beta" in rows


def test_sensitivity_groups_a_layer_norm_with_all_its_quantizers():
    qat_model = trained(kq.convert_quant_network(text_model()))
    layer = qat_model.get_layer("norm")
    groups = quantizer_groups(qat_model)
    expected = set(map(id, quantizer_roles.quantizers_of(layer).values()))
    assert expected <= set(map(id, groups["norm"]))
