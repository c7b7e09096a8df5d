"""uint8 images exported as the integer model's own uint8 inputs.

A model that takes uint8 pixels (`keras.Input(dtype="uint8")`) and
rescales them (`Rescaling(1 / 255)`) is converted with the rescaled values
on the exact grid of the 256 pixel values (`int8_rules.uint8_pixel_range`):
step `scale`, zero point `-offset / scale`. The TFLite model then needs no
float op at its input: `export_tflite` traces the model from the rescaled
values on (a float32 input in place of the uint8 input and its Rescaling)
and has the converter make that input uint8 with the grid's scale and
zero point, which holds the pixels themselves.
"""

import keras

from keras_qat import graph, int8_rules
from keras_qat.layers.fake_quant import FakeQuant


def _pixel_rescaling(model_graph, input_layer):
    """The `Rescaling` that puts `input_layer`'s uint8 values on the exact
    grid of the `FakeQuant` after it, or None."""
    tensor = input_layer.output
    if keras.backend.standardize_dtype(tensor.dtype) != "uint8":
        return None
    consumers = model_graph.consumers(input_layer)
    if len(consumers) != 1 or not isinstance(consumers[0], keras.layers.Rescaling):
        return None
    quantizers = model_graph.consumers(consumers[0])
    if len(quantizers) != 1 or not isinstance(quantizers[0], FakeQuant):
        return None
    quantizer = quantizers[0]
    options = {k: getattr(quantizer, k) for k in ("num_bits", "symmetric", "narrow_range")}
    pixel_range = int8_rules.uint8_pixel_range(consumers[0], options)
    if pixel_range is None or quantizer.fixed_range != pixel_range:
        return None
    return consumers[0]


def pixel_rescalings(model):
    """`{input name: Rescaling}` of the model inputs that are uint8 pixels
    on an exact grid."""
    model_graph = graph.Graph(model)
    found = {}
    for layer in model_graph.input_layers:
        rescaling = _pixel_rescaling(model_graph, layer)
        if rescaling is not None:
            found[layer.name] = rescaling
    return found


def takes_pixels(model):
    """Whether every input of `model` is uint8 pixels on an exact grid."""
    return bool(model.inputs) and len(pixel_rescalings(model)) == len(model.inputs)


def from_rescaled_values(model):
    """`model` with each pixel input and its Rescaling replaced by a float32
    input of the same name that takes the rescaled values."""
    rescalings = {id(layer) for layer in pixel_rescalings(model).values()}

    def call(operation, *args, **kwargs):
        if id(operation) in rescalings:
            return args[0]
        return operation(*args, **kwargs)

    return graph.rebuild(model, call, dtype="float32")


METADATA_NAME = "keras_qat_pixel_inputs"


def mark(tflite_bytes, positions):
    """`tflite_bytes` with a metadata entry listing the input positions that
    take pixels (integers fed as they are, not quantized floats)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    buffer = schema.BufferT()
    buffer.data = list(",".join(str(p) for p in positions).encode())
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = list(model.metadata or []) + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def marked_positions(tflite_bytes):
    """The input positions `mark` listed, as a set (empty for other models)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(tflite_bytes, 0)
    for index in range(model.MetadataLength()):
        entry = model.Metadata(index)
        if entry.Name() and entry.Name().decode() == METADATA_NAME:
            text = bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode()
            return {int(p) for p in text.split(",") if p}
    return set()
