"""keras-hub models, at tiny configurations with random weights: their
custom blocks are traced (`keras_qat.transforms.tracing`) and the int8
model matches the Keras one; what cannot be traced yet is refused with the
layer and the reason."""

import re

import keras
import keras_hub
import numpy as np
import pytest
from reference import OLD_BATCH_MATMUL
from test_export import calibrate

import keras_qat as kq
from keras_qat.export.interpreter import float_ops

COMPUTE_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"}


def mobilenet_v3():
    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[1], [4]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]],
        stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [2]],
        stackwise_se_ratio=[[0.25], [None]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        squeeze_and_excite=0.5,
        last_layer_filter=32,
        input_num_filters=8,
        image_shape=(32, 32, 3),
    )


def resnet(pre_activation):
    def build():
        return keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 16],  # keras-hub requires 64 first
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="basic_block",
            use_pre_activation=pre_activation,
            image_shape=(32, 32, 3),
        )

    build.__name__ = f"resnet_pre_activation_{pre_activation}"
    return build


def deit():
    return keras_hub.models.DeiTBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
    )


def efficientnet():
    """An unfused (MBConv) and a fused stage, squeeze-and-excite in both."""
    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["unfused", "fused"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        num_features=32,
        input_shape=(32, 32, 3),
    )


def densenet():
    return keras_hub.models.DenseNetBackbone(
        stackwise_num_repeats=[2, 2], image_shape=(32, 32, 3), growth_rate=8
    )


def image_classifier():
    """A task model: backbone and head, without a preprocessor."""
    backbone = resnet(False)()
    return keras_hub.models.ImageClassifier(backbone=backbone, num_classes=4, preprocessor=None)


def text_encoder():
    """Two keras-hub TransformerEncoders (post- and pre-normalization) with
    an int32 padding mask, on embedded tokens."""
    tokens = keras.Input((10,), dtype="int32", name="token_ids")
    padding = keras.Input((10,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(50, 16)(tokens)
    x = keras_hub.layers.TransformerEncoder(32, 2, name="block_0")(x, padding_mask=padding)
    x = keras_hub.layers.TransformerEncoder(32, 2, normalize_first=True, name="block_1")(
        x, padding_mask=padding
    )
    outputs = keras.layers.Dense(5, name="logits")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model([tokens, padding], outputs)


def assert_parity(result, max_steps=4):
    """Issue 34's target: a mean difference of at most one output step, the
    same top-1 wherever two outputs are not within a step. A few outputs are
    2-4 steps apart: after layer norms (TFLite lowers them to nine int8 ops,
    as in test_attention's encoder block) and in ResNets (measured over
    random initializations: 0.1-0.2 % of outputs, docs/conversion.md)."""
    assert result["mean_abs_diff"] <= result["output_scale"]
    assert result["top1_agreement_unambiguous"] == 1.0
    assert result["max_diff_steps"] <= max_steps + 0.001, result
    assert result["within_one_step"] >= 0.95, result


def inputs_for(model, n, seed=0):
    rng = np.random.default_rng(seed)
    batch = []
    for tensor in model.inputs:
        shape = (n,) + tuple(tensor.shape[1:])
        if tensor.name == "token_ids":
            batch.append(rng.integers(0, 50, shape).astype("int32"))
        elif "int" in str(tensor.dtype):
            batch.append((rng.random(shape) > 0.2).astype("int32"))
        else:
            batch.append(rng.standard_normal(shape).astype("float32"))
    return batch if len(batch) > 1 else batch[0]


@pytest.mark.parametrize(
    "build",
    [
        mobilenet_v3,
        text_encoder,
        resnet(True),
        resnet(False),
        deit,
        efficientnet,
        densenet,
        image_classifier,
    ],
    ids=lambda f: f.__name__,
)
def test_keras_hub_models_convert_train_and_export_with_parity(build):
    keras.utils.set_random_seed(0)
    model = build()
    qat_model = calibrate(kq.convert_quant_network(model), inputs_for(model, 32), steps=2)
    layer_classes = {type(layer).__module__ for layer in qat_model.layers}
    assert not any(module.startswith("keras_hub") for module in layer_classes)
    tflite_model = kq.export_tflite(qat_model)
    assert not set(float_ops(tflite_model)) & COMPUTE_OPS
    result = kq.compare_tflite(qat_model, tflite_model, inputs_for(model, 64, seed=1))
    # EfficientNet (seed 0) was 0.21 steps off on average, top-1 99.55 %,
    # until its swish products were rounded as XNNPACK's MUL rounds them.
    # DeiT's tokens go through two layer norms of tiny-variance rows: single
    # values are up to 8-10 steps apart on some initializations (measured,
    # 2026-12-07: seeds 0 / 1 / 2 max 4-6 / 8 / 4, this test 4 or 10 as the
    # scales' last bit moves; mean 0.02-0.09 steps, top-1 100 %).
    assert_parity(result, max_steps=10 if build is deit else 4)


def fixed_length(backbone, length=12):
    """The backbone on inputs of one sequence length (keras-hub's take any)."""
    inputs = {t.name: keras.Input((length,), dtype="int32", name=t.name) for t in backbone.inputs}
    return keras.Model(inputs, backbone(inputs), name=f"{backbone.name}_{length}")


# A tiny text backbone: vocabulary 50, two blocks of two heads, width 16.
TINY_TEXT = dict(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16)


def bert():
    return fixed_length(
        keras_hub.models.BertBackbone(**TINY_TEXT, intermediate_dim=32, max_sequence_length=12)
    )


def text_batch(model, n, seed=0, length=12):
    rng = np.random.default_rng(seed)
    batch = {
        "token_ids": rng.integers(0, 50, (n, length)).astype("int32"),
        "segment_ids": rng.integers(0, 2, (n, length)).astype("int32"),
        "padding_mask": (np.arange(length) < rng.integers(4, length + 1, (n, 1))).astype("int32"),
    }
    return {name: batch[name] for name in model.input}


def test_a_bert_backbone_converts_trains_and_exports_with_parity():
    keras.utils.set_random_seed(0)
    model = bert()
    off = kq.convert_quant_network(model, quant_delay=10**6)
    x = text_batch(model, 16)
    # Eager calls: a traced `predict` of each costs more than the check.
    expected, traced = model(x, training=False), off(x, training=False)
    for name in expected:
        np.testing.assert_allclose(traced[name], expected[name], rtol=1e-5, atol=1e-5)
    qat_model = kq.convert_quant_network(model)
    y = {name: np.random.default_rng(1).normal(size=v.shape) for name, v in expected.items()}
    qat_model.compile(keras.optimizers.SGD(1e-3), "mse")
    qat_model.fit(x, y, epochs=2, verbose=0)
    tflite_model = kq.export_tflite(qat_model)
    assert float_ops(tflite_model) == []
    for result in kq.compare_tflite(qat_model, tflite_model, text_batch(model, 64, seed=2)):
        assert_parity(result)


def test_a_gpt2_backbone_converts_trains_and_exports_with_parity():
    # Its decoders' CachedMultiHeadAttention is traced without a cache, as a
    # MultiHeadAttention; its causal mask has one equal row per example.
    keras.utils.set_random_seed(0)
    model = fixed_length(
        keras_hub.models.GPT2Backbone(**TINY_TEXT, intermediate_dim=32, max_sequence_length=12)
    )
    assert_sequence_model_converts_trains_and_exports_with_parity(model, tolerance=1e-5)


def assert_sequence_model_converts_trains_and_exports_with_parity(model, tolerance):
    """With its quantizers off, the converted `model` (token ids in, a
    sequence of width 16 out) computes what `model` computes to
    `tolerance`; trained, it exports all-int8 with `assert_parity`."""
    x = text_batch(model, 16)
    off = kq.convert_quant_network(model, quant_delay=10**6)
    np.testing.assert_allclose(  # eager calls: cheaper than a traced `predict` of each
        off(x, training=False), model(x, training=False), rtol=tolerance, atol=tolerance
    )
    qat_model = kq.convert_quant_network(model)
    qat_model.compile(keras.optimizers.SGD(1e-3), "mse")
    qat_model.fit(x, np.random.default_rng(1).normal(size=(16, 12, 16)), epochs=2, verbose=0)
    tflite_model = kq.export_tflite(qat_model)
    assert float_ops(tflite_model) == []
    assert_parity(kq.compare_tflite(qat_model, tflite_model, text_batch(model, 64, seed=2)))


def test_an_esm_backbone_with_dot_product_attention_converts_and_exports_with_parity():
    # Its attention calls keras.ops.dot_product_attention (with a mask over
    # the padded queries), and its rotary embedding returns two tensors
    # where its inherited compute_output_shape declares one.
    keras.utils.set_random_seed(0)
    model = fixed_length(
        keras_hub.models.ESMBackbone(
            **{**TINY_TEXT, "num_layers": 1}, intermediate_dim=32, max_sequence_length=12
        )
    )
    assert_sequence_model_converts_trains_and_exports_with_parity(model, tolerance=1e-4)


def test_a_text_classifier_task_model_converts_at_a_fixed_length():
    # keras-hub's task models are Functional: backbone and head convert
    # together; the preprocessor (tokenizer) is not part of the graph.
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        **{**TINY_TEXT, "num_layers": 1}, intermediate_dim=32, max_sequence_length=12
    )
    classifier = keras_hub.models.BertTextClassifier(backbone, num_classes=3, preprocessor=None)
    model = fixed_length(classifier)
    qat_model = kq.convert_quant_network(model)
    x = text_batch(model, 16)
    qat_model.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    qat_model.fit(x, np.arange(16) % 3, epochs=2, verbose=0)
    tflite_model = kq.export_tflite(qat_model)
    assert float_ops(tflite_model) == []
    assert_parity(kq.compare_tflite(qat_model, tflite_model, text_batch(model, 64, seed=2)))


# Decoder-only language models: one block, grouped-query attention (two
# query heads, one key/value head), rotary embeddings, RMS normalization.
TINY_DECODER = dict(
    vocabulary_size=50,
    num_layers=1,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=16,
    intermediate_dim=32,
)
DECODERS = {
    "llama": lambda: keras_hub.models.LlamaBackbone(**TINY_DECODER),
    "qwen3": lambda: keras_hub.models.Qwen3Backbone(**TINY_DECODER, head_dim=8),
    "gemma": lambda: keras_hub.models.GemmaBackbone(**TINY_DECODER, head_dim=8),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_language_models_convert_train_and_export_all_int8(name):
    # Their rotary embeddings (split, negation, stack, constant tables),
    # RMS normalizations (square or power, mean, rsqrt or 1 / sqrt),
    # einsum attention with a masked Softmax layer: traced as the int8
    # kernels compute them (keras_qat.transforms.operation_forms).
    keras.utils.set_random_seed(0)
    model = fixed_length(DECODERS[name]())
    x = text_batch(model, 16)
    qat_model = kq.convert_quant_network(model)
    qat_model.compile(keras.optimizers.SGD(1e-3), "mse")
    qat_model.fit(x, np.random.default_rng(1).normal(size=(16, 12, 16)), epochs=2, verbose=0)
    tflite_model = kq.export_tflite(qat_model)
    assert float_ops(tflite_model) == []
    result = kq.compare_tflite(qat_model, tflite_model, text_batch(model, 64, seed=2))
    if name == "gemma":
        # The issue's target, though up to 5 steps apart (7 with TF 2.20's
        # BATCH_MATMUL; measured: mean 0.05 steps, 98.7 % within one;
        # before its rotary key's stacked halves were zero-centred, 0.78
        # steps and 99.4 % top-1).
        assert result["mean_abs_diff"] <= 0.2 * result["output_scale"], result
        assert result["top1_agreement_unambiguous"] == 1.0, result
        assert result["within_one_step"] >= 0.95, result
        return
    assert_parity(result)


def test_a_backbone_with_an_open_sequence_length_is_refused_with_the_way_to_fix_it():
    backbone = bert().layers[-1]
    with pytest.raises(ValueError) as error:
        kq.convert_quant_network(backbone)
    message = str(error.value)
    # With Keras 3.10 / keras-hub 0.22 the broadcast to the input's shape is
    # the operation found with the unknown size (measured), not the slice.
    assert re.search(r"'position_embedding' \(PositionEmbedding\): (Slice|BroadcastTo)", message)
    assert "unknown when traced" in message
    assert "keras.Model(inputs, backbone(inputs))" in message


def test_a_vit_backbone_traces_to_the_function_it_computes_and_exports_with_parity():
    # Its class token is tiled to the batch and its position table looked up
    # inside the layer: both become graph tensors (BatchBroadcast,
    # WeightOperand). The class token is stored on the concatenation's grid:
    # requantized there by XNNPACK it was a step off, which the layer norm of
    # its small-variance row made 13 (16 x 16 images: mean 2.7 steps, top-1
    # 97 %). At 32 x 32 (bench/keras_hub_parity.py's protocol, seed 0) two
    # roundings were left: a few float inputs at a tie of TFLite's QUANTIZE
    # and one variance level at a tie of its fixed-point RSQRT, which the
    # layer norms made up to 23 steps (95 % within one step, top-1 99.9 %);
    # both are rounded as the kernels round them now (measured: exact).
    keras.utils.set_random_seed(0)
    model = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )
    x = np.random.default_rng(0).standard_normal((32, 32, 32, 3)).astype("float32")
    off = kq.convert_quant_network(model, quant_delay=10**6)
    np.testing.assert_allclose(  # eager calls: cheaper than a traced `predict` of each
        off(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5
    )
    qat_model = kq.convert_quant_network(model)
    targets = np.random.default_rng(0).standard_normal((32, 17, 8)).astype("float32")
    qat_model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    for _ in range(2):
        qat_model.train_on_batch(x, targets)
    tflite_model = kq.export_tflite(qat_model)
    assert not set(float_ops(tflite_model)) & COMPUTE_OPS
    x = np.random.default_rng(10).standard_normal((64, 32, 32, 3)).astype("float32")
    result = kq.compare_tflite(qat_model, tflite_model, x)
    # TF 2.20 (its BATCH_MATMUL rounds near-ties otherwise, reference.py):
    # 0.051 steps, 98.98 % within one, up to 19 steps, one token in about
    # 1,000 with another argmax.
    assert result["mean_abs_diff"] <= 0.1 * result["output_scale"], result
    assert result["top1_agreement_unambiguous"] >= (0.998 if OLD_BATCH_MATMUL else 1.0), result
    assert result["within_one_step"] >= 0.98, result
    assert result["max_diff_steps"] <= (20 if OLD_BATCH_MATMUL else 4) + 0.001, result
