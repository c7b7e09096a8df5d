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
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.fusion import Conv2DBnAct, DenseBnAct
from keras_qat.layers.quant import QuantConv2DBnAct, QuantDenseBnAct
from keras_qat.ops import fake_quant

__version__ = "0.1.0"

__all__ = [
    "Conv2DBnAct",
    "DenseBnAct",
    "FakeQuant",
    "QuantConfig",
    "QuantConv2DBnAct",
    "QuantDenseBnAct",
    "convert_quant_network",
    "fake_quant",
]
