"""TFLite export of a trained quantization network.

`export_tflite` saves the quantization network as a SavedModel, traced so
that every fake-quant op runs unconditionally, and hands it to the TFLite
converter. The converter reads each activation's range from the FakeQuant
ops and each weight's from the weight fake-quant ops, so no representative
dataset is needed and the integer model uses exactly the trained grids.
`check_exportable` (`keras_qat.export.checks`) lists, before conversion,
everything that keeps a model from int8.
"""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_qat import graph, quantizer_roles
from keras_qat.export import int16, pixel_inputs
from keras_qat.export.checks import check_activation_type, check_exportable
from keras_qat.export.interpreter import float_ops
from keras_qat.export.io_order import in_keras_order
from keras_qat.export.quiet import quiet
from keras_qat.export.saved_model import save_for_conversion, unsaved_gradients_unmentioned
from keras_qat.layers.call_context import tracing_for_export
from keras_qat.transforms.clones import Clones, clone


def export_tflite(
    qat_model,
    path=None,
    *,
    input_type=None,
    output_type=tf.float32,
    allow_float_ops=False,
    select_tf_ops=False,
    strip_names=False,
    pack_int4=True,
    activations="int8",
    verbose=None,
):
    """Converts a trained quantization network to an int8 TFLite model.

    The model is exported as a SavedModel (traced so that every fake-quant
    op runs) and converted by `tf.lite.TFLiteConverter.from_saved_model`.
    Activation ranges come from the `FakeQuant` layers and weight ranges from
    the weights, so no representative dataset is needed. Conv2D and
    FullyConnected ops become int8 with int32 bias; per-channel weights stay
    per channel (a per-channel Dense is exported as a 1x1 CONV_2D, which the
    converter quantizes per channel). Weights of 2 to 8 bits are stored with
    their trained integer levels (INT4 up to 4 bits, see `pack_int4`). A model trained with
    mixed precision is exported in float32, from the same float32 weights
    and ranges. Unknown input dimensions stay unknown: resize the
    interpreter's inputs before running it.

    Args:
        qat_model: A trained model from `convert_quant_network`.
        path: Optional file to write the flatbuffer to, a `str` or
            `os.PathLike` in an existing directory.
        input_type: `tf.float32` (a QUANTIZE op at the input), `tf.int8` or
            `tf.uint8` (integer input, quantized with the input range), or
            None (the default): `tf.uint8` for a model whose inputs are
            uint8 images rescaled onto an exact 8-bit grid
            (`Input(dtype="uint8")`, then `Rescaling(1 / 255)` or any scale
            and offset whose zero point `-offset / scale` is an integer from
            0 to 255; `keras_qat.export.pixel_inputs`), whose TFLite input
            then takes the pixels themselves, else `tf.float32`.
        output_type: `tf.float32`, `tf.int8` or `tf.uint8`.
        allow_float_ops: Whether a model in which the converter left float
            compute ops is returned instead of raising.
        select_tf_ops: Whether TensorFlow ops that TFLite has no kernel for
            (a skipped LSTM's tensor lists, for example) may stay as Select
            TF ops; the model then runs only where the Flex delegate is
            linked (TFLite's select-TF-ops builds; the Python interpreter of
            the `tensorflow` package does not have it).
        strip_names: Whether to remove tensor names and signature
            definitions, the strings a deployed model does not need (see
            `strip_tflite_names`).
        pack_int4: Whether weights of 2 to 4 bits are stored as INT4, two
            values a byte (True), or as int8 tensors holding the same levels
            (False). Only convolutions, depthwise convolutions and dense
            layers take INT4 weights; transposed convolutions, embedding
            tables and layer norms store theirs as int8 either way. TFLite
            2.21 runs INT4 ops on its built-in kernels only, not with
            XNNPACK, the default CPU delegate, so int8 storage runs faster
            and matches the Keras model more closely, at a larger size
            (docs/measurements.md, docs/known-limits.md).
        activations: `"int8"`, or `"int16"` for TFLite's 16x8 mode (int16
            activations, int8 weights, int64 biases), from a network
            converted with `num_bits=[8, 16], symmetric=[True, True],
            narrow_range=[True, True]`. TFLite runs it on its built-in
            kernels (XNNPACK has no 16x8 path); `keras_qat.export.int16`
            says what the export fixes in the converter's result. Weights
            are stored as int8 whatever `pack_int4` says.
        verbose: Whether to show TensorFlow's logging of the SavedModel
            export and the conversion; `None` shows it only when
            `TF_CPP_MIN_LOG_LEVEL=0` is set.

    Returns:
        The flatbuffer, as bytes.

    Raises:
        ValueError: if a range is not calibrated, degenerate or still
            delayed, if weights are asymmetric or wider than 8 bits, if
            activations are not 8-bit (16-bit symmetric with
            `activations="int16"`; all listed at once), for an invalid
            `path`, `input_type`, `output_type` or `activations`, if the
            converter left int8 activations in a 16x8 model, if the converter needs
            Select TF ops and `select_tf_ops` is False, or, unless
            `allow_float_ops`, if float compute ops are left (they are named).

    Example:

    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    >>> qat = kq.convert_quant_network(model, per_channel=[True, False],
    ...     symmetric=[True, False], narrow_range=[True, False])
    >>> x = np.random.default_rng(0).uniform(-1, 1, (64, 4)).astype("float32")
    >>> qat.compile(optimizer="sgd", loss="mse")
    >>> qat.fit(x, np.zeros((64, 3)), verbose=0).history["loss"] != []
    True
    >>> tflite_bytes = export_tflite(qat)
    >>> kq.compare_tflite(qat, tflite_bytes, x)["within_one_step"]
    1.0
    """
    if input_type is None:
        input_type = tf.uint8 if pixel_inputs.takes_pixels(qat_model) else tf.float32
    for name, value in (("input_type", input_type), ("output_type", output_type)):
        if tf.as_dtype(value) not in (tf.float32, tf.int8, tf.uint8):
            raise ValueError(
                f"Received an invalid value for `{name}`, expected tf.float32, "
                f"tf.int8 or tf.uint8. Received: {name}={value!r}"
            )
    if not isinstance(pack_int4, (bool, np.bool_)):
        raise ValueError(f"`pack_int4` must be True or False. Received: pack_int4={pack_int4!r}")
    pack_int4 = bool(pack_int4)
    _check_activations(activations, input_type, output_type)
    _check_path(path)
    check_exportable(qat_model, activations)
    with quiet(verbose):
        tflite_bytes = _convert(
            qat_model,
            input_type=tf.as_dtype(input_type),
            output_type=tf.as_dtype(output_type),
            select_tf_ops=select_tf_ops,
            pack_int4=pack_int4,
            int16_activations=activations == "int16",
        )
        left = float_ops(tflite_bytes)
    if left and not allow_float_ops:
        raise ValueError(
            "The TFLite converter left float compute ops in the model: "
            f"{', '.join(left)}. Pass allow_float_ops=True to accept a "
            "partly float model."
        )
    tflite_bytes = in_keras_order(tflite_bytes, _input_names(qat_model))
    if input_type == tf.uint8 and pixel_inputs.takes_pixels(qat_model):
        tflite_bytes = pixel_inputs.mark(tflite_bytes, range(len(qat_model.inputs)))
    return _finish(tflite_bytes, path, strip_names)


def _input_names(model):
    """The names `model.export` gives the signature's inputs: the input
    tensors' names."""
    return [tensor.name for tensor in model.inputs]


def _check_activations(activations, input_type, output_type):
    check_activation_type(activations)
    for name, value in (("input_type", input_type), ("output_type", output_type)):
        if activations == "int16" and tf.as_dtype(value) != tf.float32:
            raise ValueError(
                f"A 16x8 model is exported with float32 inputs and outputs (a QUANTIZE / "
                f"DEQUANTIZE op at each). Received: activations='int16', {name}={value!r}"
            )


def _convert(qat_model, input_type, output_type, select_tf_ops, pack_int4, int16_activations):
    """The SavedModel of `qat_model`, traced for export, through the converter;
    a 16x8 model is audited and its biases widened (`export.int16`)."""
    if not int16_activations:
        return _run_converter(qat_model, input_type, output_type, select_tf_ops, pack_int4, False)
    tflite_bytes = _run_converter(qat_model, input_type, output_type, select_tf_ops, False, True)
    narrow = int16.int8_activations(tflite_bytes)
    if narrow:
        raise ValueError(
            "The TFLite converter left int8 activations in the 16x8 model (an op without "
            "an int16 kernel, or an embedding's int8 table): "
            f"{', '.join(narrow[:8])}{', ...' if len(narrow) > 8 else ''}."
        )
    return int16.widen_int16_biases(tflite_bytes)


def _run_converter(qat_model, input_type, output_type, select_tf_ops, pack_int4, int16_activations):
    with tempfile.TemporaryDirectory() as directory, unsaved_gradients_unmentioned():
        saved_model = os.path.join(directory, "saved_model")
        model = float32_model(qat_model)
        if input_type == tf.uint8 and pixel_inputs.takes_pixels(model):
            model = pixel_inputs.from_rescaled_values(model)
        with tracing_for_export(pack_int4, repeated_weights(model)):
            save_for_conversion(model, saved_model)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = input_type
        converter.inference_output_type = output_type
        ops = tf.lite.OpsSet
        builtins = (
            ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            if int16_activations
            else ops.TFLITE_BUILTINS
        )
        converter.target_spec.supported_ops = [builtins]
        if select_tf_ops:
            converter.target_spec.supported_ops = [builtins, ops.SELECT_TF_OPS]
            converter._experimental_lower_tensor_list_ops = False  # TF's documented advice
        try:
            return converter.convert()
        except Exception as error:  # the converter raises its own ConverterError
            if "Select TF ops" in str(error) and not select_tf_ops:
                raise ValueError(
                    "The TFLite converter has no builtin kernel for some TensorFlow ops of "
                    "this model (a skipped LSTM or GRU layer's tensor lists, for example). "
                    "Pass select_tf_ops=True (and allow_float_ops=True) to keep them as "
                    "Select TF ops, which run with the Flex delegate, or replace those "
                    "layers (an LSTM with unroll=True and a fixed sequence length "
                    "converts to builtin ops)."
                ) from error
            raise


def repeated_weights(model):
    """`{id(weight quantizer): group}` for the weights that `model`
    quantizes more than once with the same values: a layer called several
    times, or layers with equal weights, which trace to one constant (see
    `WeightQuantizer._on_export_grid`)."""
    groups, calls = {}, {}
    for layer, role, quantizer in quantizer_roles.model_quantizers(model):
        if quantizer_roles.kind(role) == quantizer_roles.WEIGHTS:
            values = np.asarray(layer.quantized_weights()[role])
            key = (values.shape, values.tobytes(), quantizer.num_bits, quantizer.per_channel)
            groups.setdefault(key, []).append(quantizer)
            calls[id(quantizer)] = len(graph.node_arguments(layer))
    repeated = {}
    for index, members in enumerate(groups.values()):
        if sum(calls[id(q)] for q in members) > 1:
            repeated.update({id(q): index for q in members})
    return repeated


def float32_model(model):
    """`model`, or, when a layer computes in another dtype (mixed precision),
    a float32 copy of it with the same (float32) weights and ranges."""
    if all(layer.compute_dtype == "float32" for layer in graph.all_layers(model)):
        return model
    clones = Clones()

    def call(operation, *args, **kwargs):
        if isinstance(operation, keras.layers.Layer):
            layer = clones.of(operation, lambda: clone(operation, dtype="float32"))
            return layer(*args, **kwargs)
        return clone(operation)(*args, **kwargs)

    copy = graph.rebuild(model, call)
    clones.copy_weights()
    return copy


def _check_path(path):
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            "Received an invalid value for `path`, expected None, a str or an "
            f"os.PathLike. Received: path={path!r}"
        )
    directory = os.path.dirname(os.fspath(path)) or "."
    if not os.path.isdir(directory):
        raise ValueError(
            f"Received an invalid value for `path`: directory '{directory}' does not "
            f"exist. Received: path={path!r}"
        )


def _finish(tflite_bytes, path, strip_names):
    if strip_names:
        tflite_bytes = strip_tflite_names(tflite_bytes)
    if path is not None:
        with open(path, "wb") as f:
            f.write(tflite_bytes)
    return tflite_bytes


def strip_tflite_names(tflite_bytes):
    """Returns the flatbuffer without tensor names and signature definitions.

    The interpreter runs such a model by tensor index (`get_input_details`,
    as `run_tflite` does); signature runners are gone. The strings are about
    2 KB of the int8 LeNet's 74 KB.

    Args:
        tflite_bytes: A TFLite flatbuffer, as bytes.

    Returns:
        The smaller flatbuffer, as bytes.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    flatbuffer_utils.strip_strings(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def export_float_tflite(model, path=None, strip_names=False, verbose=None):
    """Converts a float Keras model to a float32 TFLite model, as a baseline.

    Args:
        model: Any Keras model (for example the float fusion network).
        path: Optional file to write the flatbuffer to (`str` or
            `os.PathLike`, in an existing directory).
        strip_names: Whether to remove tensor names and signature
            definitions (see `strip_tflite_names`).
        verbose: Whether to show TensorFlow's logging (as in
            `export_tflite`).

    Returns:
        The flatbuffer, as bytes.
    """
    _check_path(path)
    with quiet(verbose), tempfile.TemporaryDirectory() as directory:
        saved_model = os.path.join(directory, "saved_model")
        with unsaved_gradients_unmentioned():
            save_for_conversion(model, saved_model)
            tflite_bytes = tf.lite.TFLiteConverter.from_saved_model(saved_model).convert()
    return _finish(in_keras_order(tflite_bytes, _input_names(model)), path, strip_names)
