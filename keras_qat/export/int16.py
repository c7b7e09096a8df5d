"""TFLite's 16x8 mode: int16 activations, int8 weights.

The converter builds a 16x8 model from a quantization network whose
activation `FakeQuant`s are 16-bit and symmetric (zero point 0), with
`EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8` and no
representative dataset. Two things about TF 2.21's result need this module:

- It stores the biases of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and
  TRANSPOSE_CONV as int32, while those kernels' 16x8 paths read an int64
  bias: a lone conv with an all-zero int32 bias of 4 channels came out
  exact on channels 0 and 1 (the 16 bytes read as two int64 zeros) and
  saturated on channels 2 and 3 (read past the buffer). The converter's
  `_experimental_full_integer_quantization_bias_type` is refused without a
  representative dataset, so `widen_int16_biases` rewrites the flatbuffer:
  each such bias becomes an int64 tensor of the same values and scales.
- Where it has no int16 kernel it keeps or makes int8 tensors, which would
  be a silently coarser model; `int8_activations` lists them.
"""

import numpy as np

_BIASED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    return schema, flatbuffer_utils


def _op_names(model, schema):
    codes = {value: name for name, value in vars(schema.BuiltinOperator).items()}
    return [
        codes.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        for code in model.operatorCodes
    ]


def _data_and_bias(name, op):
    """The data and bias inputs of a biased op (TRANSPOSE_CONV's are its
    third and fourth: `output_shape, weights, input, bias`), -1 for none."""
    data, bias = (2, 3) if name == "TRANSPOSE_CONV" else (0, 2)
    return op.inputs[data], op.inputs[bias] if len(op.inputs) > bias else -1


def widen_int16_biases(tflite_bytes):
    """Returns the flatbuffer with the int32 biases of int16-input ops as int64.

    Args:
        tflite_bytes: A 16x8 TFLite flatbuffer, as bytes.

    Returns:
        The flatbuffer, as bytes (unchanged where no bias needs widening).
    """
    schema, flatbuffer_utils = _schema()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    names = _op_names(model, schema)
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            name = names[op.opcodeIndex]
            if name not in _BIASED_OPS:
                continue
            data, bias = _data_and_bias(name, op)
            if bias < 0 or subgraph.tensors[data].type != schema.TensorType.INT16:
                continue
            tensor = subgraph.tensors[bias]
            if tensor.type != schema.TensorType.INT32:
                continue
            buffer = model.buffers[tensor.buffer]
            values = np.frombuffer(bytes(bytearray(buffer.data)), np.int32).astype(np.int64)
            buffer.data = np.frombuffer(values.tobytes(), np.uint8)
            tensor.type = schema.TensorType.INT64
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def int8_activations(tflite_bytes):
    """Names of the int8 / uint8 tensors that are not constant (weights):
    activations that a 16x8 model should hold in int16."""
    schema, flatbuffer_utils = _schema()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    narrow = (schema.TensorType.INT8, schema.TensorType.UINT8)
    found = []
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            constant = tensor.buffer and model.buffers[tensor.buffer].data is not None
            if tensor.type in narrow and not constant:
                found.append(
                    tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
                )
    return found
