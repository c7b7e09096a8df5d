"""Custom layers are converted through the graph their `call` builds, or
refused with the layer and the reason."""

import re

import keras
import numpy as np
import pytest
from test_export import ops_and_tensors
from test_fuse import randomize_bns

import keras_qat as kq
from keras_qat.export.interpreter import float_ops, run_tflite
from keras_qat.transforms.tracing import trace_layers

L = keras.layers
OFF = 10**6  # a quant_delay that no test reaches: every quantizer is off


class ResidualBlock(L.Layer):
    """conv-BN-ReLU, conv-BN, plus the input, ReLU: a block written as a
    Layer subclass, as users and keras-hub write them."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv_1 = L.Conv2D(filters, 3, padding="same", use_bias=False, name="conv_1")
        self.bn_1 = L.BatchNormalization(name="bn_1")
        self.conv_2 = L.Conv2D(filters, 3, padding="same", use_bias=False, name="conv_2")
        self.bn_2 = L.BatchNormalization(name="bn_2")

    def call(self, inputs, training=None):
        x = keras.ops.relu(self.bn_1(self.conv_1(inputs), training=training))
        x = self.bn_2(self.conv_2(x), training=training)
        return keras.ops.relu(x + inputs)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class Stage(L.Layer):
    """Blocks made of blocks: two ResidualBlocks."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [ResidualBlock(filters, name=f"block_{i}") for i in range(2)]

    def call(self, inputs):
        for block in self.blocks:
            inputs = block(inputs)
        return inputs


def network(stage_trainable=True):
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = ResidualBlock(6, name="first")(x)
    stage = Stage(6, name="stage")
    stage.trainable = stage_trainable
    x = stage(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4, name="logits")(x), name="net")


def images(n=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 3)).astype("float32")


def test_custom_blocks_become_their_layers_and_compute_the_same():
    model = randomize_bns(network(), np.random.default_rng(1))
    qat_model = kq.convert_quant_network(model, quant_delay=OFF)
    classes = {type(layer) for layer in kq.transforms.convert.graph.all_layers(qat_model)}
    assert not classes & {ResidualBlock, Stage}
    names = [layer.name for layer in qat_model.layers]
    assert len(names) == len(set(names))
    # Sub-layers keep their names where free, else take their block's as a prefix.
    assert {"conv_1", "block_0_conv_1", "block_1_conv_1"} <= set(names)
    x = images()
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


def test_traced_blocks_train_and_export_to_int8_with_parity():
    model = randomize_bns(network(), np.random.default_rng(2))
    qat_model = kq.convert_quant_network(model)
    x, y = images(32), np.random.default_rng(3).standard_normal((32, 4)).astype("float32")
    qat_model.compile("adam", "mse")
    before = [w.numpy().copy() for w in qat_model.trainable_weights]
    qat_model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(
        not np.array_equal(b, w.numpy()) for b, w in zip(before, qat_model.trainable_weights)
    )
    tflite_model = kq.export_tflite(qat_model)
    assert not set(float_ops(tflite_model)) & {"CONV_2D", "FULLY_CONNECTED", "ADD"}
    result = kq.compare_tflite(qat_model, tflite_model, x)
    assert result["max_diff_steps"] <= 1.0 + 1e-4
    assert result["top1_agreement_unambiguous"] == 1.0


def test_a_frozen_block_stays_frozen():
    qat_model = kq.convert_quant_network(network(stage_trainable=False))
    layers = {layer.name: layer for layer in qat_model.layers}
    frozen = [
        layer
        for name, layer in layers.items()
        if name.startswith("block_") and not isinstance(layer, kq.FakeQuant)
    ]
    assert frozen and not any(layer.trainable for layer in frozen)
    assert layers["conv_1"].trainable and layers["conv_1"].trainable_weights


def test_skip_layers_keeps_a_custom_layer_whole_in_float():
    qat_model = kq.convert_quant_network(network(), skip_layers=["stage"])
    assert isinstance(qat_model.get_layer("stage"), Stage)
    assert "conv_1" in [layer.name for layer in qat_model.layers]


def test_a_model_without_custom_layers_is_returned_as_it_is():
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    assert trace_layers(model, lambda layer: False) is model


class BatchSized(L.Layer):
    """Reads the batch size, which symbolic tensors do not have."""

    def call(self, inputs):
        return inputs * keras.ops.ones((keras.ops.shape(inputs)[0], 1, 1))

    def compute_output_shape(self, input_shape):
        return input_shape


class Scaled(L.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


class PositionTable(L.Layer):
    """Adds rows of an embedding table looked up outside the graph."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = L.Embedding(5, 4)
        self.positions = np.arange(5)[None]

    def call(self, inputs):
        return inputs + self.table(self.positions)


class FixedOffset(L.Layer):
    """A non-trainable weight used in an operation: a constant of the graph."""

    def build(self, input_shape):
        self.offset = self.add_weight(
            shape=(input_shape[-1],), initializer="random_normal", trainable=False
        )

    def call(self, inputs):
        return inputs - self.offset


def sequence_model(layer):
    inputs = keras.Input((5, 4))
    x = L.Dense(4, name="projection")(inputs)
    return keras.Model(inputs, L.Dense(3, name="head")(layer(x)))


class RowNumbers(L.Layer):
    """Multiplies each example by its row number: no graph for any batch
    size computes that from a traced constant."""

    def call(self, inputs):
        rows = keras.ops.arange(keras.ops.shape(inputs)[0], dtype="float32")
        return inputs * keras.ops.reshape(rows, (-1, 1, 1))

    def compute_output_shape(self, input_shape):
        return input_shape


@pytest.mark.parametrize(
    "layer, reason",
    [
        (PositionTable(name="odd"), "takes a tensor computed from trainable weights outside"),
        (RowNumbers(name="odd"), "takes a constant whose shape depends on the batch size"),
    ],
)
def test_a_layer_that_cannot_be_traced_is_named_with_the_reason(layer, reason):
    with pytest.raises(ValueError) as error:
        kq.convert_quant_network(sequence_model(layer))
    message = str(error.value)
    assert f"'odd' ({type(layer).__name__}): " in message
    assert reason in message
    assert "skip_layers" in message
    # Kept in float, it converts.
    qat_model = kq.convert_quant_network(sequence_model(layer), skip_layers=["odd"])
    assert type(qat_model.get_layer("odd")) is type(layer)


class BlockWithRowNumbers(L.Layer):
    """A block whose sub-layer, named the same in every block, cannot be
    traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rows = RowNumbers(name="rows")

    def call(self, x):
        return self.rows(x) + x


def test_untraceable_layers_of_the_same_name_in_two_blocks_are_all_named():
    # Each block's 'rows' stays whole in the traced graph, twice under one
    # name: the error must still be the tracing one, listing both.
    inputs = keras.Input((5, 4))
    block = BlockWithRowNumbers
    outputs = block(name="block_b")(block(name="block_a")(inputs))
    with pytest.raises(ValueError, match="cannot trace these layers") as error:
        kq.convert_quant_network(keras.Model(inputs, outputs))
    reasons = re.findall(
        r"'rows' \(RowNumbers\): Multiply '\w+' takes a constant whose shape", str(error.value)
    )
    assert len(reasons) == 2, str(error.value)


class TwoOutputs(L.Layer):
    """Returns two tensors while its output shape says one (keras-hub's ESM
    rotary embedding)."""

    def call(self, x):
        return x * 2.0, x * 3.0

    def compute_output_shape(self, input_shape):
        return input_shape


class BlockWithTwoOutputs(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.split = TwoOutputs()

    def call(self, x):
        first, second = self.split(x)
        return first - second


def test_a_sub_layer_returning_other_outputs_than_it_declares_is_traced_by_its_call():
    model = sequence_model(BlockWithTwoOutputs(name="block"))
    qat_model = kq.convert_quant_network(model, quant_delay=10**6)
    x = sequences(8)
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )


class IgnoresItsMask(L.Layer):
    """Takes a second tensor and does not use it."""

    def call(self, x, mask_values):
        return x * 2.0


class LengthTable(L.Layer):
    """Builds a table from the sequence length, which must be known."""

    def call(self, x):
        return x + keras.ops.ones((keras.ops.shape(x)[1], 1))


def test_a_call_that_leaves_a_tensor_argument_unused_converts_or_is_refused_with_the_reason():
    x, m = keras.Input((5, 4)), keras.Input((5, 4))
    model = keras.Model([x, m], IgnoresItsMask(name="odd")(x, m))
    if tuple(int(p) for p in keras.version().split(".")[:2]) < (3, 15):
        # Keras 3.10's graphs take no unused input: refused with the reason
        # (its MultiHeadAttention takes query_mask through __call__ only).
        with pytest.raises(ValueError, match="'odd' .IgnoresItsMask.: its `call` leaves some"):
            kq.convert_quant_network(model)
        return
    data = [sequences(4), sequences(4, seed=1)]
    off = kq.convert_quant_network(model, quant_delay=10**6)
    np.testing.assert_allclose(off.predict(data, verbose=0), model.predict(data, verbose=0))


def test_a_call_that_needs_an_unknown_length_is_refused_with_the_fix():
    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, LengthTable(name="odd")(inputs))
    with pytest.raises(ValueError, match=r"other than the batch is None: convert a model whose"):
        kq.convert_quant_network(model)


def sequences(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 5, 4)).astype("float32")


class WithScores(L.Layer):
    """Returns `(outputs, None)` without scores, as keras-hub's DeiT blocks
    do: a symbolic call that Keras refuses to record."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(4, name="dense")

    def call(self, inputs, return_scores=False):
        return self.dense(inputs), (inputs if return_scores else None)


class Encoder(L.Layer):
    """Two WithScores blocks; returns a constant (an empty tensor) too."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = [WithScores(name=f"block_{i}") for i in range(2)]

    def call(self, inputs):
        for block in self.blocks:
            inputs, scores = block(inputs)
        assert scores is None  # the caller still receives None
        return inputs, keras.ops.zeros((0, 4))


def test_blocks_returning_none_and_constants_are_traced():
    model = sequence_model(lambda x: Encoder(name="encoder")(x)[0])
    qat_model = kq.convert_quant_network(model, quant_delay=OFF)
    classes = {type(layer) for layer in qat_model.layers}
    assert not classes & {Encoder, WithScores} and kq.QuantDenseBnAct in classes
    x = sequences(4)
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("n", [1, 8])
def test_a_layer_that_reads_the_batch_size_converts_for_any_batch_size(n):
    model = sequence_model(BatchSized(name="batch_sized"))
    qat_model = kq.convert_quant_network(model, quant_delay=OFF)
    x = sequences(n)
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


def test_a_weight_used_in_an_operation_trains_and_exports_as_a_constant_operand():
    model = sequence_model(Scaled(name="scaled"))
    start = np.linspace(0.5, 1.5, 4).astype("float32")
    model.get_layer("scaled").scale.assign(start)
    qat_model = kq.convert_quant_network(model)
    operand = qat_model.get_layer("scaled_scale")
    assert isinstance(operand, kq.WeightOperand) and operand.trainable_weights
    np.testing.assert_array_equal(operand.value.numpy(), start)
    x, y = sequences(32), np.random.default_rng(1).standard_normal((32, 5, 3)).astype("f4")
    qat_model.compile("adam", "mse")
    qat_model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert not np.allclose(operand.value.numpy(), start)
    tflite_model = kq.export_tflite(qat_model)
    assert float_ops(tflite_model) == []
    assert kq.compare_tflite(qat_model, tflite_model, x)["max_diff_steps"] <= 1.001


def test_a_non_trainable_weight_becomes_a_constant_of_the_graph():
    model = sequence_model(FixedOffset(name="offset"))
    qat_model = kq.convert_quant_network(model, quant_delay=OFF)
    x = np.random.default_rng(0).standard_normal((8, 5, 4)).astype("float32")
    # Within the constant's int8 step (it is stored on its own int8 grid).
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=0, atol=2e-3
    )
    assert "offset" not in [layer.name for layer in qat_model.layers]


def test_a_traced_model_saves_and_loads(tmp_path):
    qat_model = kq.convert_quant_network(network())
    path = str(tmp_path / "traced.keras")
    qat_model.save(path)
    loaded = keras.saving.load_model(path)
    x = images(4)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qat_model.predict(x, verbose=0))


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = L.Conv2D(6, 3, padding="same", name="stem")
        self.block = ResidualBlock(6, name="block")
        self.pool = L.GlobalAveragePooling2D(name="pool")
        self.logits = L.Dense(4, name="logits")

    def call(self, inputs):
        return self.logits(self.pool(self.block(self.stem(inputs))))


def test_a_subclassed_model_is_refused_with_the_way_to_trace_it():
    model = SubclassedNet()
    model(images(2))
    with pytest.raises(ValueError, match=r"kq\.as_functional\(model, keras\.Input\(shape\)\)"):
        kq.convert_quant_network(model)


@pytest.mark.parametrize("given", ["sample batch", "keras.Input"])
def test_a_subclassed_model_converts_through_as_functional(given):
    model = SubclassedNet()
    x = images(8)
    expected = model.predict(x, verbose=0)
    inputs = x if given == "sample batch" else keras.Input((8, 8, 3))
    functional = kq.as_functional(model, inputs)
    assert functional.input_shape == (None, 8, 8, 3)
    np.testing.assert_allclose(functional.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-6)
    qat_model = kq.convert_quant_network(functional, quant_delay=OFF)
    np.testing.assert_allclose(qat_model.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)


def test_as_functional_refuses_what_is_not_an_input_or_a_batch():
    with pytest.raises(ValueError, match=r"Received an invalid value for `inputs`.*Received: 3"):
        kq.as_functional(SubclassedNet(), 3)


class UnconfigurableBlock(ResidualBlock):
    """keras-hub's LlamaTransformerDecoder has a `get_config` that raises;
    tracing does not need one."""

    def get_config(self):
        raise AttributeError("no attribute 'rope_scaling_factor'")


def test_a_custom_layer_without_a_working_config_inside_a_nested_model_is_traced():
    inner_inputs = keras.Input((8, 8, 6))
    inner = keras.Model(inner_inputs, UnconfigurableBlock(6, name="block")(inner_inputs))
    inputs = keras.Input((8, 8, 3))
    x = inner(L.Conv2D(6, 3, padding="same", name="stem")(inputs))
    model = keras.Model(inputs, L.Dense(4, name="logits")(L.GlobalAveragePooling2D()(x)))
    qat_model = kq.convert_quant_network(model, quant_delay=OFF)
    x = images(4)
    np.testing.assert_allclose(
        qat_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4
    )


class NamedEmbedding(L.Embedding):
    """An Embedding subclass that keeps `Embedding.call` (an extra option)."""

    def __init__(self, *args, note="", **kwargs):
        super().__init__(*args, **kwargs)
        self.note = note


class ReversibleEmbedding(L.Embedding):
    """keras-hub 0.22's ReversibleEmbedding as it was before Keras had one:
    its own `call`, looking up with `Embedding.call` unless `reverse`."""

    __module__ = "keras_hub.src.layers.modeling.reversible_embedding"

    def __init__(self, *args, tie_weights=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.tie_weights = tie_weights

    def call(self, inputs, reverse=False):
        if reverse:
            return keras.ops.matmul(inputs, keras.ops.transpose(self.embeddings))
        return super().call(inputs)


class DoubledEmbedding(L.Embedding):
    """An Embedding subclass whose `call` computes something else."""

    def call(self, inputs):
        return super().call(inputs) * 2.0


@pytest.mark.parametrize("embedding", [NamedEmbedding, ReversibleEmbedding])
def test_an_embedding_subclass_that_looks_up_rows_is_a_quant_embedding(embedding):
    """Refused before (an Embedding subclass was neither traced nor matched:
    keras-hub 0.22's own ReversibleEmbedding, 6 keras-hub tests at the
    oldest versions)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    model = keras.Model(inputs, L.Dense(3)(embedding(20, 4)(inputs)))
    ids = np.random.default_rng(0).integers(0, 20, (32, 6)).astype("int32")
    off = kq.convert_quant_network(model, quant_delay=OFF)
    assert "QuantEmbedding" in [type(layer).__name__ for layer in off.layers]
    np.testing.assert_allclose(
        off.predict(ids, verbose=0), model.predict(ids, verbose=0), atol=1e-6
    )
    qat_model = kq.convert_quant_network(model)
    kq.calibrate(qat_model, ids, verbose=0)
    tflite_bytes = kq.export_tflite(qat_model)
    assert float_ops(tflite_bytes) == []
    assert kq.compare_tflite(qat_model, tflite_bytes, ids)["max_diff_steps"] <= 1.001


def test_an_embedding_subclass_with_its_own_call_is_traced_not_taken_for_a_lookup():
    """Its `call` is traced, never converted as a plain lookup that drops
    what the `call` adds; the operation it cannot quantize (a `take` of its
    table) is named with the layer whose call it came from."""
    inputs = keras.Input((6,), dtype="int32")
    model = keras.Model(inputs, L.Dense(3)(DoubledEmbedding(20, 4, name="doubled")(inputs)))
    with pytest.raises(ValueError, match=r"Take, in the call of 'doubled' \(DoubledEmbedding\)"):
        kq.convert_quant_network(model)


class PositionTable(L.Layer):
    """A learned position table added to the input, broadcast to its shape
    as keras-hub's `PositionEmbedding` broadcasts it."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(8, input_shape[-1]), initializer="random_normal")

    def call(self, inputs):
        shape = keras.ops.shape(inputs)
        rows = keras.ops.slice(keras.ops.convert_to_tensor(self.table), (0, 0), shape[1:])
        return inputs + keras.ops.broadcast_to(rows, shape)


def test_a_table_broadcast_to_the_batch_for_an_add_is_left_to_the_add():
    """The ADD broadcasts the batch axis itself: no BROADCAST_TO in the
    model (TF 2.20's converter left BROADCAST_TO of the constant, and the
    ADD, in float)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 4))
    model = keras.Model(inputs, L.Dense(3)(PositionTable()(inputs)))
    x = np.random.default_rng(0).normal(size=(16, 6, 4)).astype("float32")
    off = kq.convert_quant_network(model, quant_delay=OFF)
    assert "BatchBroadcast" not in [type(layer).__name__ for layer in off.layers]
    np.testing.assert_allclose(off.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    qat_model = kq.calibrate(kq.convert_quant_network(model), x, verbose=0)
    tflite_bytes = kq.export_tflite(qat_model)
    assert float_ops(tflite_bytes) == []
    assert kq.compare_tflite(qat_model, tflite_bytes, x)["max_diff_steps"] <= 1.001


class PrependSmallToken(L.Layer):
    """A learned token tiled to the batch before the sequence, its values
    small beside the sequence's (a randomly initialized ViT class token)."""

    def build(self, input_shape):
        init = keras.initializers.RandomUniform(0.0, 0.06)
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer=init)

    def call(self, x):
        token = keras.ops.tile(self.token, (keras.ops.shape(x)[0], 1, 1))
        return keras.ops.concatenate([token, x], axis=1)


def test_a_token_concatenated_to_a_sequence_is_stored_on_the_concatenations_grid():
    """With a grid of its own the token was requantized onto the
    concatenation's by an int8 QUANTIZE, which XNNPACK rounds coarsely: a
    keras-hub ViT's class token was a step off and its layer norm made that
    13 steps (TF 2.21); TF 2.20's converter did not requantize it at all."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 64))
    model = keras.Model(inputs, PrependSmallToken(name="prepend")(L.Dense(64)(inputs)))
    x = np.random.default_rng(0).normal(size=(16, 4, 64)).astype("float32")
    qat_model = kq.calibrate(kq.convert_quant_network(model), x, verbose=0)
    assert "prepend_token_quant" not in [layer.name for layer in qat_model.layers]
    tflite_bytes = kq.export_tflite(qat_model)
    ops, tensors = ops_and_tensors(tflite_bytes)
    requantized = [
        op
        for op in ops
        if op["op_name"] == "QUANTIZE" and tensors[op["inputs"][0]]["dtype"] != np.float32
    ]
    assert requantized == []
    outputs, scale = run_tflite(tflite_bytes, x)
    token_steps = np.abs(outputs[:, 0] - qat_model.predict(x, verbose=0)[:, 0]) / scale
    assert token_steps.max() < 1e-3, token_steps.max()
