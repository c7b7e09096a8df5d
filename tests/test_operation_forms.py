"""Keras operations that tracing records as others (square as a product,
einsum as a matmul, ...): the rewrite computes what the operation computes,
and the result exports to an all-int8 model that the TFLite interpreter
runs as the Keras model does."""

import keras
import numpy as np
import pytest

import keras_qat as kq
from keras_qat.export.interpreter import float_ops
from keras_qat.transforms.operation_forms import matmul_plan

L = keras.layers
ops = keras.ops
OFF = 10**6


class Block(L.Layer):
    """A custom layer computing `function(x)` (and `function(x, mask)`)."""

    def __init__(self, function, **kwargs):
        super().__init__(**kwargs)
        self.function = function

    def call(self, x, mask=None):
        return self.function(x) if mask is None else self.function(x, mask)


def heads(x, n=2):
    return ops.reshape(x, (-1, 6, n, 8 // n))


def rope_like(x):
    """Rotates halves as keras-hub's rotary embeddings do: split, negate,
    stack, then products with constant tables."""
    first, second = ops.split(x, 2, axis=-1)
    rotated = ops.reshape(ops.stack((-second, first), axis=-2), (-1, 6, 8))
    return x * COS + rotated * SIN


def table(seed):
    """A (6, 8) table of levels k / 128, k from -128 to 127 with both ends
    in it: exact on the int8 grid of its own range, where the converter
    stores a constant (and conversion puts it, quant delay or not)."""
    levels = np.random.default_rng(seed).integers(-128, 128, 48)
    levels[:2] = -128, 127
    return (levels / 128).reshape(6, 8).astype("float32")


COS, SIN = table(0), table(1)


def rms_norm(x):
    """Llama's and Gemma's RMS normalizations."""
    llama = x * ops.rsqrt(ops.mean(ops.power(x, 2), axis=-1, keepdims=True) + 1e-6)
    gemma = x * ops.reciprocal(ops.sqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + 1e-6))
    return llama + gemma


def where_per_position(x, mask):
    """Zeros where a position is padded in any example: a condition of
    shape (6, 1, 1) for `x` of shape (batch, 6, 2, 4), broadcast as `where`
    broadcasts it (leading axes first)."""
    padded = ops.reshape(ops.logical_not(ops.all(mask > 0, axis=0)), (6, 1, 1))
    return ops.reshape(ops.where(padded, ops.zeros_like(x), x), (-1, 6, 8))


CASES = {
    "square_power_negative": lambda x: ops.square(x) + ops.power(x, 2) - (-x),
    "moveaxis": lambda x: ops.reshape(ops.moveaxis(heads(x), (1, 2), (2, 1)), (-1, 6, 8)),
    "split_stack_last": lambda x: ops.reshape(ops.stack(ops.split(x, 2, -1), axis=-1), (-1, 6, 8)),
    "rope": rope_like,
    "rms_norm": rms_norm,
    "einsum_attention": lambda x: ops.reshape(
        ops.einsum("bqhd,bkhd->bhqk", heads(x), heads(x * 0.5)), (-1, 6, 12)
    ),
    "einsum_grouped": lambda x: ops.reshape(
        ops.einsum(
            "btkgh,bskh->bkgts",
            ops.reshape(x, (-1, 6, 1, 2, 4)),
            ops.reshape(x[..., :4], (-1, 6, 1, 4)),
        ),
        (-1, 6, 12),
    ),
    "grouped_masked_softmax": lambda x, mask: ops.reshape(
        L.Softmax(name="softmax")(
            ops.einsum(
                "btkgh,bskh->bkgts",
                ops.reshape(x, (-1, 6, 1, 2, 4)),
                ops.reshape(x[..., :4], (-1, 6, 1, 4)),
            ),
            mask[:, None, None, None, :] > 0,
        ),
        (-1, 6, 12),
    ),
    "where_zeros_lower_rank": lambda x, mask: where_per_position(heads(x), mask),
    "where_zeros": lambda x, mask: ops.where(mask[..., None] < 1, ops.zeros_like(x), x),
    "masked_softmax": lambda x, mask: L.Softmax(name="softmax")(
        ops.einsum("bqhd,bkhd->bhqk", heads(x), heads(x)), mask[:, None, None, :] > 0
    ),
}


def model_of(case):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8), name="x")
    x = L.Dense(8, name="projection")(inputs)
    if "where" in case or "masked" in case:
        mask = keras.Input((6,), dtype="int32", name="mask")
        y = Block(CASES[case], name="block")(x, mask)
        inputs = [inputs, mask]
    else:
        y = Block(CASES[case], name="block")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(y)))


def batch(model, n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6, 8)).astype("float32")
    if len(model.inputs) == 1:
        return x
    mask = (np.arange(6) < rng.integers(1, 7, (n, 1))).astype("int32")
    mask[0] = 0  # a row that attends nothing
    return [x, mask]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_rewritten_operation_computes_what_it_computes_and_exports_all_int8(case):
    model = model_of(case)
    x = batch(model)
    off = kq.convert_quant_network(model, quant_delay=OFF)
    np.testing.assert_allclose(
        off.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )
    qat_model = kq.convert_quant_network(model)
    qat_model.compile(keras.optimizers.SGD(1e-3), "mse")
    qat_model.fit(x, np.zeros((32, 3)), epochs=2, batch_size=16, verbose=0)
    tflite_model = kq.export_tflite(qat_model)
    assert float_ops(tflite_model) == []
    result = kq.compare_tflite(qat_model, tflite_model, batch(model, seed=1))
    assert result["mean_abs_diff"] <= 0.5 * result["output_scale"], result
    assert result["max_diff_steps"] <= 3.001, result


@pytest.mark.parametrize(
    "subscripts, plan",
    [
        ("bqhd,bkhd->bhqk", ([0, 2, 1, 3], [0, 2, 3, 1], [0, 1, 2, 3], 2)),
        ("bhqk,bkhd->bqhd", ([0, 1, 2, 3], [0, 2, 1, 3], [0, 2, 1, 3], 2)),
        ("btkgh,bskh->bkgts", ([0, 2, 1, 3, 4], [0, 2, 3, 1], [0, 1, 3, 2, 4], 2)),
        ("ij,jk->ik", None),  # no batch index: an EinsumDense-style product
        ("bij,bjk->bik", ([0, 1, 2], [0, 1, 2], [0, 1, 2], 1)),
        ("bi,bi->b", None),  # no free index
        ("b...d,bkd->bk", None),
    ],
)
def test_einsum_as_matmul_plans(subscripts, plan):
    assert matmul_plan(subscripts) == plan
