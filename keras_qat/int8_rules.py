"""What TFLite's integer kernels do: where they round, and to which grid.

One vocabulary throughout: every int8 tensor lies on a *grid* (a scale and
zero point). A `FakeQuant` in the Keras model stands for a grid, and sits
where the integer model rounds a result onto one. For each kind of
operation, the integer kernel either

- *rounds its output* onto a grid of its own: convolutions, matmuls,
  element-wise arithmetic, activations, global average pooling
  (`ROUNDING_LAYERS`, `ROUNDING_OPERATIONS`); a `FakeQuant` follows it;
- *keeps its input's grid*: it moves or selects values without computing
  new ones (`GRID_KEEPING_LAYERS`: max pooling, reshaping, padding, ...);
  nothing follows it;
- *shares one grid between its inputs and its output*: concatenation (all
  operands of CONCATENATION have one scale) and average pooling (int8
  AVERAGE_POOL_2D keeps its input's scale) (`SHARED_GRID_LAYERS`);
- or *rounds its producer's result onto its own grid*: a ReLU / ReLU6 is
  fused into the op before it, and the inputs of a concatenation or average
  pooling are written on the shared grid. The producer then rounds once, to
  its consumer's grid, and needs no `FakeQuant` of its own
  (`rounds_for_producer`). A fused ReLU / ReLU6 is a clamp in that
  rounding: in the Keras model it is the `activation` of the `FakeQuant`
  that stands for the grid (`fused_activation`).

The second operand of a matmul of two tensors must be on a zero-centred
grid: TFLite's int8 BATCH_MATMUL ignores its zero point
(`transforms.place` makes its `FakeQuant` symmetric on the narrow grid).

Some outputs have a fixed grid whatever the data (`FIXED_OUTPUT_RANGES`),
and two activations are computed as two int8 ops with a rounding in between
(`TWO_OP_ACTIVATIONS`).
"""

import keras
import numpy as np

from keras_qat import graph
from keras_qat.layers.activations import QuantHardSigmoid, QuantSwish
from keras_qat.layers.attention_mask import AttentionScoreMask, AttentionWeightMask
from keras_qat.layers.batch_broadcast import BatchBroadcast

L = keras.layers

# Activations that integer kernels fuse into the op before them.
FUSED_ACTIVATIONS = ("relu", "relu6")

# Activations that TFLite computes as two int8 ops, with a fixed grid in
# between, and the layers that round there: hard_sigmoid as ADD (fused ReLU6,
# grid [0, 6]) then MUL; swish as LOGISTIC (grid [0, 255/256]) then MUL.
TWO_OP_ACTIVATIONS = {"hard_sigmoid": QuantHardSigmoid, "silu": QuantSwish}

# Arguments of Keras layers that add LoRA weights or Keras' own
# (post-training) quantization: not quantized here, never carried over.
KERAS_QUANTIZATION_ARGUMENTS = ("quantization_config", "lora_rank", "lora_alpha")

# Outputs whose grid TFLite's int8 kernels fix: sigmoid and softmax have
# scale 1/256 and zero point -128, tanh scale 1/128 and zero point 0; hard
# sigmoid's is [0, 1] by construction (relu6(x + 3) * (1 / 6)).
FIXED_OUTPUT_RANGES = {
    "hard_sigmoid": (0.0, 1.0),
    "sigmoid": (0.0, 255 / 256),
    "softmax": (0.0, 255 / 256),
    "tanh": (-1.0, 127 / 128),
}

# Layers whose integer kernel rounds its output onto a grid of its own
# (besides the quantized fusion layers).
ROUNDING_LAYERS = (
    L.Add,
    L.Subtract,
    L.Multiply,
    L.ReLU,
    L.LeakyReLU,
    L.Activation,
    L.Softmax,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
)

# Keras operations (`x + y`, `x * 3.0`) whose integer kernel rounds.
ROUNDING_OPERATIONS = (
    graph.ADD_OPERATION,
    graph.SUBTRACT_OPERATION,
    graph.MULTIPLY_OPERATION,
    graph.MATMUL_OPERATION,  # BATCH_MATMUL of two int8 tensors
    graph.MEAN_OPERATION,
    graph.GELU_OPERATION,
    graph.SOFTMAX_OPERATION,
    graph.RSQRT_OPERATION,
    graph.SQRT_OPERATION,
    graph.DIVIDE_OPERATION,
)

# Keras operations whose output lies on their input's grid: a cast between
# float types (mixed precision) keeps the values.
GRID_KEEPING_OPERATIONS = (graph.CAST_OPERATION, graph.PAD_OPERATION) + graph.MOVING_OPERATIONS

# Layers whose output lies on their input's grid: they move or select values
# (or, like Dropout, are the identity in inference).
GRID_KEEPING_LAYERS = (
    L.MaxPooling1D,
    L.MaxPooling2D,
    L.GlobalMaxPooling1D,
    L.GlobalMaxPooling2D,
    L.UpSampling1D,
    L.UpSampling2D,
    L.Resizing,
    L.Flatten,
    L.Reshape,
    L.Dropout,
    L.SpatialDropout1D,
    L.SpatialDropout2D,
    L.Permute,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.Cropping1D,
    L.Cropping2D,
    L.Identity,
    AttentionWeightMask,  # SELECT_V2 of the weights and 0, which lies on their grid
    BatchBroadcast,  # BROADCAST_TO
)

# Layers whose inputs and output share one grid: an attention mask is a
# SELECT_V2 of the scores and a constant, which int8 kernels take on one grid.
SHARED_GRID_LAYERS = (L.Concatenate, L.AveragePooling1D, L.AveragePooling2D, AttentionScoreMask)


def activation_name(activation):
    """The registered name of an activation function, or the class name of
    an activation object; "linear" for None."""
    if activation is None:
        return "linear"
    name = keras.activations.serialize(activation)
    name = name if isinstance(name, str) else type(activation).__name__
    return {"swish": "silu", "hard_swish": "hard_silu"}.get(name, name)


def relu_layer_activation(layer):
    """`"relu"` or `"relu6"` for a `ReLU` layer that is one (no slope, no
    threshold, no other maximum), else None."""
    config = layer.get_config()
    if config["negative_slope"] == 0 and config["threshold"] == 0:
        return {None: "relu", 6: "relu6"}.get(config["max_value"])
    return None


def keras_quantization_reason(layer):
    """Why a layer with LoRA weights or Keras' own quantization is not
    quantized here (what to do), or None."""
    config = layer.get_config()
    if config.get("quantization_config") is not None or layer.dtype_policy.quantization_mode:
        return "it is already quantized by Keras (quantization_config / Layer.quantize)"
    if config.get("lora_rank"):
        return f"lora_rank={config['lora_rank']}: LoRA weights are not quantized; merge them first"
    return None


def fused_activation(layer):
    """`"relu"` or `"relu6"` when `layer` is a ReLU / ReLU6 layer that
    integer kernels fuse into the op before it, else None."""
    if isinstance(layer, L.ReLU):
        return relu_layer_activation(layer)
    if isinstance(layer, L.Activation):
        name = activation_name(layer.activation)
        return name if name in FUSED_ACTIVATIONS else None
    return None


def multiplies_its_operands(operation):
    """Whether `operation` is an int8 MUL of its operands (a `Multiply`
    layer, `x * y`), whose product the `FakeQuant` after it rounds as
    XNNPACK does when it knows the operands' grids
    (`keras_qat.requantization.multiplied`)."""
    return isinstance(operation, (L.Multiply, graph.MULTIPLY_OPERATION))


def is_swish(layer):
    """Whether `layer` is a swish / silu `Activation` layer (a LOGISTIC, then
    a MUL of the input and the sigmoid: `QuantSwish`)."""
    return isinstance(layer, L.Activation) and activation_name(layer.activation) == "silu"


def is_fused_activation(layer):
    """Whether `layer` is a ReLU / ReLU6 that integer kernels fuse into the
    op before it."""
    return fused_activation(layer) is not None


def rounds_for_producer(consumer):
    """Whether `consumer` writes its producer's integer result onto its own
    grid, so that the producer needs no grid of its own."""
    return is_fused_activation(consumer) or isinstance(consumer, SHARED_GRID_LAYERS)


def fixed_output_range(layer):
    """The fixed output range of an activation layer's (or a softmax
    operation's) int8 kernel, or None."""
    if isinstance(layer, (L.Softmax, graph.SOFTMAX_OPERATION)):
        return FIXED_OUTPUT_RANGES["softmax"]
    if isinstance(layer, L.Activation):
        return FIXED_OUTPUT_RANGES.get(activation_name(layer.activation))
    return None


def unsupported_reason(layer):
    """Why a layer of a supported class still has no int8 form here (its
    configuration and what to do), or None.

    Resizing keeps its input's grid by nearest-neighbour sampling
    (RESIZE_NEAREST_NEIGHBOR) and rounds onto it when bilinear
    (RESIZE_BILINEAR, `keras_qat.layers.resize`); other interpolations have
    no int8 kernel here.
    """
    if isinstance(layer, (L.RNN, L.Bidirectional)):
        return (
            "recurrent layers have no int8 form here; keep it in float with "
            f"skip_layers=[{layer.name!r}] and export with allow_float_ops=True"
        )
    if isinstance(layer, graph.PAD_OPERATION):
        return _pad_reason(layer)
    if isinstance(layer, (L.Softmax, graph.SOFTMAX_OPERATION)) and not _over_last_axis(layer):
        return f"axis={layer.axis}: TFLite's SOFTMAX is over the last axis; transpose first"
    if isinstance(layer, graph.DOT_PRODUCT_ATTENTION_OPERATION):
        return (
            "quantized only on symbolic 4D query, key and value tensors (a bias or a mask may be "
            "constant) with known head counts, the queries' a multiple of the keys', a "
            "constant scalar scale and no flash attention"
        )
    if type(layer) is L.LayerNormalization:
        config = layer.get_config()
        if not normalizes_last_axis(layer):
            return f"axis={config['axis']}: only the last axis is quantized"
        if config.get("rms_scaling"):
            return "rms_scaling=True: not quantized"
    if is_embedding(layer):
        return _embedding_reason(layer)
    if isinstance(layer, (L.UpSampling2D, L.Resizing)):
        config = layer.get_config()
        if config.get("interpolation") not in ("nearest", "bilinear"):
            return (
                f"interpolation={config.get('interpolation')!r}: only 'nearest' and "
                "'bilinear' are quantized; use one of them or keep the layer in float "
                "with skip_layers"
            )
        if config.get("crop_to_aspect_ratio") or config.get("pad_to_aspect_ratio"):
            return "crop_to_aspect_ratio / pad_to_aspect_ratio: not quantized; resize only"
        if config.get("antialias"):
            return "antialias=True: not quantized; use antialias=False"
        bilinear = config.get("interpolation") == "bilinear"
        if bilinear and config.get("data_format") == "channels_first":
            return "data_format='channels_first': bilinear resizing is quantized channels-last"
    return None


_MAX_POOLINGS = (L.MaxPooling1D, L.MaxPooling2D)

# Embeddings quantized as a QuantEmbedding: Keras' own, and its reversible
# form (keras-hub's token embeddings) when only looked up (`reverse=False`).
EMBEDDINGS = (L.Embedding,) + (
    (L.ReversibleEmbedding,) if hasattr(L, "ReversibleEmbedding") else ()
)


def is_embedding(layer):
    """Whether a `QuantEmbedding` computes `layer`: Keras' `Embedding` or
    `ReversibleEmbedding`, a subclass that keeps `Embedding.call`, or
    keras-hub's own `ReversibleEmbedding` of before Keras had one (0.22: an
    `Embedding` subclass whose lookup is `Embedding.call`). Other subclasses
    compute something else in their `call` and are traced."""
    if type(layer) in EMBEDDINGS:
        return True
    if not isinstance(layer, L.Embedding):
        return False
    kind = type(layer)
    keras_hub_reversible = kind.__name__ == "ReversibleEmbedding" and kind.__module__.startswith(
        "keras_hub."
    )
    return kind.call is L.Embedding.call or keras_hub_reversible


def _embedding_reason(layer):
    """Why an embedding has no QuantEmbedding form, or None."""
    if _reversible_embedding_reason(layer):
        return _reversible_embedding_reason(layer)
    if layer.get_config().get("mask_zero"):
        return (
            "mask_zero=True: the layers after it would compute with the mask, "
            "which int8 kernels do not; build the model without the mask"
        )
    return keras_quantization_reason(layer)


def _reversible_embedding_reason(layer):
    """Why a ReversibleEmbedding has no QuantEmbedding form, or None."""
    if type(layer).call is L.Embedding.call:
        return None
    # Looked up, tied or not, it reads `embeddings` only (an untied
    # `reverse_embeddings` is left out of the converted model).
    if any(kwargs.get("reverse") for _, kwargs in graph.node_arguments(layer)):
        return "called with reverse=True (logits from the table): not quantized"
    return None


def _pad_reason(pad):
    """Why a `keras.ops.pad` has no int8 form, or None. Int8 PAD fills with
    the zero point, which is 0.0, so constant padding with 0 keeps the grid;
    padding with -inf becomes the grid's lowest value, the same for a max
    pooling after it (pre-activation ResNets pad so before pooling)."""
    reason = "only constant padding with 0 (or -inf before max pooling) is quantized"
    if pad.mode != "constant":
        return f"mode={pad.mode!r}: {reason}"
    max_pooled = all(isinstance(op, _MAX_POOLINGS) for op in graph.consumer_operations(pad))
    for _, kwargs in graph.node_arguments(pad):
        value = kwargs.get("constant_values")
        if value in (None, 0, 0.0) or (value == float("-inf") and max_pooled):
            continue
        return f"constant_values={value!r}: {reason}"
    return None


def reads_indices(operation, operand=0):
    """Whether `operation` reads its input number `operand` as indices or
    flags, not as values to compute with: an `Embedding` (a GATHER of rows),
    a cast to an integer or boolean type, an attention mask's mask (a
    SELECT_V2's condition). Float token ids and 0 / 1 masks are exact; a grid
    would round them onto other rows, or other flags."""
    if isinstance(operation, L.Embedding):
        return True
    if isinstance(operation, (AttentionScoreMask, AttentionWeightMask)):
        return operand == 1
    if isinstance(operation, graph.CAST_OPERATION):
        dtype = keras.backend.standardize_dtype(operation.dtype)
        return dtype.startswith(("int", "uint")) or dtype == "bool"
    return False


def is_bilinear_resize(layer):
    """A bilinear `UpSampling2D` / `Resizing`: its int8 kernel (RESIZE_BILINEAR)
    rounds the interpolated values onto its input's grid."""
    return (
        type(layer) in (L.UpSampling2D, L.Resizing)
        and layer.get_config().get("interpolation") == "bilinear"
    )


def _over_last_axis(softmax):
    """Whether a softmax (layer or operation) is over its input's last axis
    only, in every call (`axis=-1`, or the last axis by number)."""
    axes = softmax.axis if isinstance(softmax.axis, (list, tuple)) else [softmax.axis]
    if len(axes) != 1:
        return False
    ranks = {len(args[0].shape) for args, _ in graph.node_arguments(softmax) if args}
    return axes[0] in (-1, None) or all(axes[0] == rank - 1 for rank in ranks)


def normalizes_last_axis(layer):
    """Whether a LayerNormalization normalizes over its input's last axis
    only (`axis=-1`, or the last axis by number)."""
    axis = layer.get_config()["axis"]
    axes = [axis] if isinstance(axis, int) else list(axis)
    try:
        rank = len(layer.input.shape)
    except (AttributeError, ValueError):  # not called yet, or shared
        rank = None
    return len(axes) == 1 and (axes[0] == -1 or axes[0] == (rank or 0) - 1)


def uint8_pixel_range(rescaling, options):
    """The range of the uint8 grid that `rescaling` (a `Rescaling` of a
    uint8 input) maps the 256 integers onto, or None. `x * scale + offset`
    puts integer `q` on the grid of step `scale` whose level of zero is
    `-offset / scale`: exactly an 8-bit asymmetric (not narrow) activation
    grid when that level is an integer from 0 to 255. The TFLite model then
    takes the uint8 pixels themselves (scale `scale`, that zero point)."""
    scale, offset = (np.asarray(v, np.float64) for v in (rescaling.scale, rescaling.offset))
    if scale.size != 1 or offset.size != 1 or not float(scale) > 0:
        return None
    if options["num_bits"] != 8 or options["symmetric"] or options["narrow_range"]:
        return None
    zero = -float(offset) / float(scale)
    if not (0 <= zero <= 255 and abs(zero - round(zero)) < 1e-6):
        return None
    return (float(offset), float(offset) + 255 * float(scale))
