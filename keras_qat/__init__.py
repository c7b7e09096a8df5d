"""keras-qat: quantization-aware training for Keras 3 on TensorFlow."""

import keras as _keras

if _keras.config.backend() != "tensorflow":
    raise ImportError(
        "keras_qat needs Keras' TensorFlow backend (its fake-quant ops are "
        "TensorFlow ops), but Keras is using the "
        f"'{_keras.config.backend()}' backend. Set KERAS_BACKEND=tensorflow "
        "before importing keras."
    )

from keras_qat.config import QuantConfig
from keras_qat.convert import convert_quant_network
from keras_qat.fuse import fuse
from keras_qat.export import (
    compare_tflite,
    export_float_tflite,
    export_tflite,
    run_tflite,
    strip_tflite_names,
    tflite_interpreter,
)
from keras_qat.layers.bn_fold import (
    QuantConv2DBnFoldAct,
    QuantDenseBnFoldAct,
    QuantDepthwiseConv2DBnFoldAct,
)
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct, DepthwiseConv2DBnAct
from keras_qat.layers.quant import (
    QuantAveragePooling2D,
    QuantConcatenate,
    QuantConv2DBnAct,
    QuantDenseBnAct,
    QuantDepthwiseConv2DBnAct,
    QuantHardSigmoid,
    QuantSwish,
)
from keras_qat.ops import fake_quant

__version__ = "0.1.0"

__all__ = [
    "Conv2DBnAct",
    "DenseBnAct",
    "DepthwiseConv2DBnAct",
    "FakeQuant",
    "QuantAveragePooling2D",
    "QuantConcatenate",
    "QuantConfig",
    "QuantConv2DBnAct",
    "QuantConv2DBnFoldAct",
    "QuantDenseBnAct",
    "QuantDenseBnFoldAct",
    "QuantDepthwiseConv2DBnAct",
    "QuantDepthwiseConv2DBnFoldAct",
    "QuantHardSigmoid",
    "QuantSwish",
    "compare_tflite",
    "convert_quant_network",
    "export_float_tflite",
    "export_tflite",
    "fake_quant",
    "fuse",
    "run_tflite",
    "strip_tflite_names",
    "tflite_interpreter",
]
