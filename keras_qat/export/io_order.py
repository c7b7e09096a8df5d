"""The TFLite model's inputs and outputs in the Keras model's order.

The converter lists a model's input and output tensors in an order of its
own (measured: a two-input model came out with its inputs swapped, another
not, depending on the names). `export_tflite` rewrites the list into the
Keras model's order: its inputs as `model.inputs`, its outputs in Keras'
flat order (`output_<n>` by `n`, a dict's keys by name). A list of inputs,
a stripped model (`strip_names=True`) and `get_input_details()` then mean
what they mean for the Keras model.
"""

import numpy as np


def output_order(name):
    """The sort key of a signature output in the Keras model's flat output
    order: `output_<n>` by `n` (a single output or a list), other names (a
    dict's keys) by name, as `keras.tree.flatten` orders a dict."""
    prefix, _, number = name.rpartition("_")
    return (0, int(number), "") if prefix == "output" and number.isdigit() else (1, 0, name)


def in_keras_order(tflite_bytes, input_names):
    """`tflite_bytes` with its subgraph's inputs in the order of
    `input_names` (the Keras model's input names, which its signature uses)
    and its outputs in Keras' flat order; unchanged when they are already."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    if not model.signatureDefs:
        return tflite_bytes
    signature = model.signatureDefs[0]
    subgraph = model.subgraphs[signature.subgraphIndex]
    by_name = {t.name.decode(): t.tensorIndex for t in signature.inputs}
    if sorted(by_name) != sorted(input_names):
        raise ValueError(
            f"The TFLite model's inputs {sorted(by_name)} are not the Keras model's "
            f"{list(input_names)}."
        )
    inputs = [by_name[name] for name in input_names]
    ordered = sorted(signature.outputs, key=lambda t: output_order(t.name.decode()))
    outputs = [t.tensorIndex for t in ordered]
    if list(subgraph.inputs) == inputs and list(subgraph.outputs) == outputs:
        return tflite_bytes
    subgraph.inputs = np.array(inputs, dtype=np.int32)
    subgraph.outputs = np.array(outputs, dtype=np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def signature_tensor_names(tflite_bytes):
    """`(inputs, outputs)`: `{tensor name: signature name}` of the
    signature's inputs and outputs, each in the Keras model's order."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    signature = model.signatureDefs[0]
    tensors = model.subgraphs[signature.subgraphIndex].tensors
    subgraph = model.subgraphs[signature.subgraphIndex]
    inputs = {t.tensorIndex: t.name.decode() for t in signature.inputs}
    outputs = sorted(signature.outputs, key=lambda t: output_order(t.name.decode()))
    return (
        {tensors[i].name.decode(): inputs[i] for i in subgraph.inputs},
        {tensors[t.tensorIndex].name.decode(): t.name.decode() for t in outputs},
    )
