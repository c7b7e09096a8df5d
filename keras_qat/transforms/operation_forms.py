"""Keras operations recorded by tracing, rewritten into what conversion
quantizes and TFLite's int8 kernels compute.

A traced `call` records the operations its code uses (`keras.ops.square`,
`keras.ops.einsum`, ...). Some have a Keras layer of their own (`relu` ->
`ReLU`), so that fusion and placement see them as in a Functional model;
others have no int8 kernel as they are, but compute what other operations
compute, and are recorded as those (measured with the TFLite converter,
TensorFlow 2.21):

- `square(x)`, `power(x, 2)` -> `x * x` (SQUARE has no int8 kernel; MUL has);
- `negative(x)` -> `x * -1` (NEG has no int8 kernel);
- `reciprocal(x)` -> `1 / x` (DIV), and `reciprocal(sqrt(x))` -> `rsqrt(x)`
  (RSQRT: int8 DIV fails when a divisor rounds to 0);
- `moveaxis` -> `transpose` (TRANSPOSE);
- `split` into equal sections -> slices (STRIDED_SLICE, the input's grid);
- `stack` -> `concatenate` of the inputs with a new axis (CONCATENATION:
  one grid shared by the inputs and the output, as PACK's);
- `einsum` of two tensors with one contracted, one free index each and
  batch indices (attention's `"bqhd,bkhd->bhqk"`) -> transposes and a
  `matmul` (BATCH_MATMUL, as the converter lowers it);
- `dot_product_attention(query, key, value, bias, mask, scale)` (keras-hub's
  ESM and DINOv3 attention) -> transposes, the queries times the scale,
  `matmul`, the bias added, an `AttentionScoreMask`, softmax, `matmul`
  (MUL, BATCH_MATMUL, ADD, SELECT_V2, SOFTMAX, BATCH_MATMUL);
- a `Softmax` layer called with a mask -> `AttentionScoreMask`, softmax,
  `AttentionWeightMask` (SELECT_V2, SOFTMAX, SELECT_V2), as a
  `MultiHeadAttention`'s masked softmax;
- `where(condition, zeros_like(x), x)` -> an `AttentionWeightMask` of `x`
  (SELECT_V2 of `x` and its grid's zero).

`quantizable_form(operation, name)` gives the callable that computes the
operation from the same arguments, or None to keep it.
"""

import keras
import numpy as np

from keras_qat import graph
from keras_qat.layers.attention_mask import AttentionScoreMask, AttentionWeightMask


def quantizable_form(operation, name):
    """A callable, taking the arguments `operation` took, that computes
    what it computes as layers and operations conversion quantizes (the
    layer among them named `name`); or None when it needs no rewrite."""
    kind = type(operation)
    if kind in graph.ACTIVATION_OPERATIONS:
        return _activation_layer(graph.ACTIVATION_OPERATIONS[kind], name)
    if kind is graph.CONCATENATE_OPERATION:
        return keras.layers.Concatenate(axis=operation.axis, name=name)
    if kind is keras.layers.Softmax and _called_with_mask(operation):
        return _masked_softmax(operation, name)
    rewrite = _REWRITES.get(kind)
    return None if rewrite is None else rewrite(operation, name)


def _called_with_mask(layer):
    return any(
        len(args) > 1 or kwargs.get("mask") is not None
        for args, kwargs in graph.node_arguments(layer)
    )


def _masked_softmax(layer, name):
    """A `Softmax` layer called with a mask (keras-hub's Llama attention)
    computes `where(mask, softmax(where(mask, x, -1e9)), 0)`: an
    `AttentionScoreMask`, the softmax and an `AttentionWeightMask`, as a
    `MultiHeadAttention`'s masked softmax is converted."""

    def masked_softmax(inputs, mask=None):
        softmax = keras.layers.Softmax.from_config({**layer.get_config(), "name": name})
        if mask is None:
            return softmax(inputs)
        scores = AttentionScoreMask(name=f"{name}_score_mask")([inputs, mask])
        return AttentionWeightMask(name=f"{name}_weight_mask")([softmax(scores), mask])

    return masked_softmax


def _activation_layer(activation, name):
    if activation == "relu":
        return keras.layers.ReLU(name=name)
    if activation == "relu6":
        return keras.layers.ReLU(max_value=6.0, name=name)
    return keras.layers.Activation(activation, name=name)


def _square(operation, name):
    return lambda x: keras.ops.multiply(x, x)


def _power(operation, name):
    def power(x, exponent):
        square = np.ndim(exponent) == 0 and not keras.ops.is_tensor(exponent) and exponent == 2
        if square and _is_floating(x):
            return keras.ops.multiply(x, x)
        return keras.ops.power(x, exponent)

    return power


def _negative(operation, name):
    def negative(x):
        return keras.ops.multiply(x, -1.0) if _is_floating(x) else keras.ops.negative(x)

    return negative


def _is_floating(value):
    """Whether a tensor or constant has a floating dtype (a Python float
    does; an int does not), so that a rewrite keeps the dtype Keras gives."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return isinstance(value, float)
    return "float" in keras.backend.standardize_dtype(dtype)


def _reciprocal(operation, name):
    def reciprocal(x):
        if isinstance(graph.producer(x), graph.SQRT_OPERATION):
            # Gemma's RMSNorm: RSQRT, which int8 computes at 0 too (DIV
            # fails on a divisor rounded to 0).
            return keras.ops.rsqrt(graph.producer_arguments(x)[0])
        return keras.ops.divide(1.0, x)

    return reciprocal


def _moveaxis(operation, name):
    def moveaxis(x):
        rank = len(x.shape)
        source = [axis % rank for axis in operation.source]
        destination = [axis % rank for axis in operation.destination]
        order = [axis for axis in range(rank) if axis not in source]
        for position, axis in sorted(zip(destination, source)):
            order.insert(position, axis)
        return _transposed(x, order)

    return moveaxis


def _split(operation, name):
    def split(x):
        axis = operation.axis % len(x.shape)
        size, sections = x.shape[axis], operation.indices_or_sections
        if not isinstance(sections, int) or size is None or size % sections:
            return keras.ops.split(x, sections, axis=operation.axis)
        width = size // sections
        before = (slice(None),) * axis
        return [x[before + (slice(i * width, (i + 1) * width),)] for i in range(sections)]

    return split


def _stack(operation, name):
    def stack(tensors):
        expanded = [keras.ops.expand_dims(t, operation.axis) for t in tensors]
        return keras.layers.Concatenate(axis=operation.axis, name=name)(expanded)

    return stack


def _einsum(operation, name):
    def einsum(*operands, **kwargs):
        plan = matmul_plan(operation.subscripts) if len(operands) == 2 and not kwargs else None
        if plan is None or not all(isinstance(t, keras.KerasTensor) for t in operands):
            return keras.ops.einsum(operation.subscripts, *operands, **kwargs)
        left, right = (_transposed(t, order) for t, order in zip(operands, plan[:2]))
        batch = plan[3]
        inner = tuple(left.shape[1:batch])
        left_free, right_free = tuple(left.shape[batch:-1]), tuple(right.shape[batch + 1 :])
        flat = len(left_free) > 1 or len(right_free) > 1
        if flat and None in inner + left_free + right_free:
            return keras.ops.einsum(operation.subscripts, *operands)
        if flat:  # one free axis each, as BATCH_MATMUL takes them
            rows, columns = int(np.prod(left_free)), int(np.prod(right_free))
            left = keras.ops.reshape(left, (-1,) + inner + (rows, left.shape[-1]))
            right = keras.ops.reshape(right, (-1,) + inner + (right.shape[batch], columns))
        product = keras.ops.matmul(left, right)
        if flat:
            product = keras.ops.reshape(product, (-1,) + inner + left_free + right_free)
        return _transposed(product, plan[2])

    return einsum


def matmul_plan(subscripts):
    """For an einsum of two operands that is a batched matmul (batch
    indices in both operands and the output, one index contracted, free
    indices in each operand), the axis orders of the left operand as
    `[batch, free, contracted]`, of the right one as `[batch, contracted,
    free]`, and of the product `[batch, left free, right free]` into the
    output, and the number of batch indices; else None."""
    if "." in subscripts or "->" not in subscripts:
        return None
    inputs, output = subscripts.replace(" ", "").split("->")
    if inputs.count(",") != 1:
        return None
    left, right = inputs.split(",")
    if any(len(set(s)) != len(s) for s in (left, right, output)):
        return None
    batch = [i for i in output if i in left and i in right]
    contracted = [i for i in left if i in right and i not in output]
    left_free = [i for i in left if i not in right]
    right_free = [i for i in right if i not in left]
    product = batch + left_free + right_free
    if len(contracted) != 1 or not left_free or not right_free:
        return None
    if sorted(product) != sorted(output) or left[0] not in batch or right[0] not in batch:
        return None
    return (
        [left.index(i) for i in batch + left_free + contracted],
        [right.index(i) for i in batch + contracted + right_free],
        [product.index(i) for i in output],
        len(batch),
    )


def _transposed(x, order):
    return x if order == list(range(len(order))) else keras.ops.transpose(x, order)


def _dot_product_attention(operation, name):
    """`keras.ops.dot_product_attention` on `(batch, positions, heads,
    depth)` tensors, as Keras' TensorFlow backend computes it: the scores
    `q k^T * scale` (scale `1 / sqrt(depth)` unless given), plus `bias`,
    those that `mask` (boolean, broadcast to `(batch, heads, queries,
    keys)`) or `is_causal` exclude set to a large negative value (a row that
    excludes every key then weighs all keys equally), softmax, times the
    values; keys and values with fewer heads repeated to the queries'. The
    scale multiplies the queries before the product (the same in float, one
    MUL on the smaller tensor). Like that backend, it has no logit soft cap;
    a `flash_attention` request is left to Keras (TensorFlow has none)."""
    causal = operation.is_causal

    def attention(query, key, value, bias=None, mask=None, scale=None, **options):
        for option in ("flash_attention", "attn_logits_soft_cap"):
            options.setdefault(option, getattr(operation, option, None))
        if options["flash_attention"] or not _attention_form_applies(
            query, key, value, bias, mask, scale
        ):
            return keras.ops.dot_product_attention(
                query, key, value, bias, mask, scale, is_causal=causal, **options
            )
        heads, kv_heads = query.shape[2], key.shape[2]
        if heads != kv_heads:
            key, value = (keras.ops.repeat(t, heads // kv_heads, axis=2) for t in (key, value))
        scale = float(1 / np.sqrt(key.shape[-1]) if scale is None else scale)
        queries = _transposed(keras.ops.multiply(query, scale), [0, 2, 1, 3])
        scores = keras.ops.matmul(queries, _transposed(key, [0, 2, 3, 1]))
        if bias is not None:
            scores = keras.ops.add(scores, bias)
        if mask is not None or causal:
            mask_input = scores if mask is None else [scores, _mask_of_rank_4(mask)]
            scores = AttentionScoreMask(causal, name=f"{name}_score_mask")(mask_input)
        weights = keras.layers.Softmax(name=name)(scores)
        context = keras.ops.matmul(weights, _transposed(value, [0, 2, 1, 3]))
        return _transposed(context, [0, 2, 1, 3])

    return attention


def _mask_of_rank_4(mask):
    """`mask` with leading axes of size 1 up to rank 4; a constant one (a
    sliding window's, made from the sequence length) as a boolean array."""
    if isinstance(mask, keras.KerasTensor):
        return _with_rank(mask, 4)
    mask = np.asarray(mask).astype(bool)
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _attention_form_applies(query, key, value, bias, mask, scale):
    """Whether `_dot_product_attention`'s form computes the call (what
    `int8_rules.unsupported_reason` says otherwise): symbolic 4D tensors (a
    bias or a mask may be constant), known head counts (the queries' a multiple of the
    keys'), and a scalar scale."""
    tensors = (query, key, value) if isinstance(mask, np.ndarray) else (query, key, value, mask)
    tensors = [t for t in tensors if t is not None]
    if not all(isinstance(t, keras.KerasTensor) for t in tensors) or len(query.shape) != 4:
        return False
    heads, kv_heads = query.shape[2], key.shape[2]
    if None in (heads, kv_heads, key.shape[-1]) or heads % kv_heads:
        return False
    return scale is None or (np.ndim(scale) == 0 and not isinstance(scale, keras.KerasTensor))


def _where(operation, name):
    """`where(condition, zeros_like(x), x)` (Gemma's attention wipes rows
    without attended tokens so) keeps `x`'s grid: an `AttentionWeightMask`
    of `x` where the condition is False (SELECT_V2 of `x` and its zero)."""

    def where(condition, x1, x2):
        if _zeros_like(x1, x2) and _broadcasts_to(condition, x2):
            keep = keras.ops.logical_not(_with_rank(condition, len(x2.shape)))
            return AttentionWeightMask(name=name)([x2, keep])
        if _zeros_like(x2, x1) and _broadcasts_to(condition, x1):
            return AttentionWeightMask(name=name)([x1, _with_rank(condition, len(x1.shape))])
        return keras.ops.where(condition, x1, x2)

    return where


def _broadcasts_to(condition, x):
    """Whether symbolic `condition` broadcasts to `x`'s shape without
    widening it."""
    if not isinstance(condition, keras.KerasTensor) or len(condition.shape) > len(x.shape):
        return False
    pairs = zip(reversed(condition.shape), reversed(x.shape))
    return all(c == 1 or c == d for c, d in pairs)


def _with_rank(condition, rank):
    """`condition` with leading axes of size 1 up to `rank`, as `where`
    broadcasts it."""
    while len(condition.shape) < rank:
        condition = keras.ops.expand_dims(condition, 0)
    return condition


def _zeros_like(zeros, tensor):
    """Whether symbolic `zeros` is `keras.ops.zeros_like(tensor)`."""
    if not isinstance(zeros, keras.KerasTensor):
        return False
    arguments = graph.producer_arguments(zeros)
    return isinstance(graph.producer(zeros), graph.ZEROS_LIKE_OPERATION) and (
        bool(arguments) and arguments[0] is tensor
    )


_REWRITES = {
    graph.DOT_PRODUCT_ATTENTION_OPERATION: _dot_product_attention,
    graph.WHERE_OPERATION: _where,
    graph.SQUARE_OPERATION: _square,
    graph.POWER_OPERATION: _power,
    graph.NEGATIVE_OPERATION: _negative,
    graph.RECIPROCAL_OPERATION: _reciprocal,
    graph.MOVEAXIS_OPERATION: _moveaxis,
    graph.SPLIT_OPERATION: _split,
    graph.STACK_OPERATION: _stack,
    graph.EINSUM_OPERATION: _einsum,
}

# The Keras operations recorded as others (and a Softmax layer with a mask).
REWRITTEN_OPERATIONS = tuple(_REWRITES)
