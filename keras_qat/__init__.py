"""keras-qat: quantization-aware training for Keras 3 on TensorFlow."""

import keras as _keras

if _keras.config.backend() != "tensorflow":
    raise ImportError(
        "keras_qat needs Keras' TensorFlow backend (its fake-quant ops are "
        "TensorFlow ops), but Keras is using the "
        f"'{_keras.config.backend()}' backend. Set KERAS_BACKEND=tensorflow "
        "before importing keras."
    )

from keras_qat import callbacks
from keras_qat.calibration import calibrate
from keras_qat.export.checks import check_exportable
from keras_qat.export.interpreter import compare_tflite, run_tflite, tflite_interpreter
from keras_qat.export.litert import (
    export_float_tflite,
    export_tflite,
    strip_tflite_names,
)
from keras_qat.export.onnx_export import compare_onnx, export_onnx, run_onnx
from keras_qat.layers.activations import QuantHardSigmoid, QuantSwish
from keras_qat.layers.attention_mask import (
    AttentionScoreMask,
    AttentionWeightMask,
    QuantAttentionScoreMask,
)
from keras_qat.layers.batch_broadcast import BatchBroadcast
from keras_qat.layers.conv1d import Conv1DBnAct, DepthwiseConv1DBnAct
from keras_qat.layers.conv2d import Conv2DBnAct, DepthwiseConv2DBnAct
from keras_qat.layers.conv2d_transpose import Conv2DTransposeBnAct
from keras_qat.layers.dense import DenseBnAct
from keras_qat.layers.embedding import QuantEmbedding
from keras_qat.layers.fake_quant import FakeQuant
from keras_qat.layers.layer_norm import QuantLayerNormalization
from keras_qat.layers.learned_range import LearnedFakeQuant, LearnedWeightQuantizer
from keras_qat.layers.quantized import (
    QuantConv1DBnAct,
    QuantConv1DBnFoldAct,
    QuantConv2DBnAct,
    QuantConv2DBnFoldAct,
    QuantConv2DTransposeBnAct,
    QuantConv2DTransposeBnFoldAct,
    QuantDenseBnAct,
    QuantDenseBnFoldAct,
    QuantDepthwiseConv1DBnAct,
    QuantDepthwiseConv1DBnFoldAct,
    QuantDepthwiseConv2DBnAct,
    QuantDepthwiseConv2DBnFoldAct,
)
from keras_qat.layers.resize import QuantResizing, QuantUpSampling2D
from keras_qat.layers.shared_range import (
    QuantAveragePooling1D,
    QuantAveragePooling2D,
    QuantConcatenate,
)
from keras_qat.layers.weight_operand import WeightOperand
from keras_qat.layers.weight_quantizer import WeightQuantizer
from keras_qat.quantizers import fake_quant
from keras_qat.report import quant_report
from keras_qat.report_table import QuantReport
from keras_qat.sensitivity import SensitivityResult, sensitivity
from keras_qat.transforms.convert import convert_quant_network
from keras_qat.transforms.fuse import fuse
from keras_qat.transforms.tracing import as_functional

__version__ = "0.2.0.dev0"

__all__ = [
    "AttentionScoreMask",
    "AttentionWeightMask",
    "BatchBroadcast",
    "Conv1DBnAct",
    "Conv2DBnAct",
    "Conv2DTransposeBnAct",
    "DenseBnAct",
    "DepthwiseConv1DBnAct",
    "DepthwiseConv2DBnAct",
    "FakeQuant",
    "LearnedFakeQuant",
    "LearnedWeightQuantizer",
    "QuantAttentionScoreMask",
    "QuantAveragePooling1D",
    "QuantAveragePooling2D",
    "QuantConcatenate",
    "QuantConv1DBnAct",
    "QuantConv1DBnFoldAct",
    "QuantConv2DBnAct",
    "QuantConv2DBnFoldAct",
    "QuantConv2DTransposeBnAct",
    "QuantConv2DTransposeBnFoldAct",
    "QuantDenseBnAct",
    "QuantDenseBnFoldAct",
    "QuantDepthwiseConv1DBnAct",
    "QuantDepthwiseConv1DBnFoldAct",
    "QuantDepthwiseConv2DBnAct",
    "QuantDepthwiseConv2DBnFoldAct",
    "QuantEmbedding",
    "QuantHardSigmoid",
    "QuantLayerNormalization",
    "QuantReport",
    "QuantResizing",
    "QuantSwish",
    "QuantUpSampling2D",
    "SensitivityResult",
    "WeightOperand",
    "WeightQuantizer",
    "as_functional",
    "calibrate",
    "callbacks",
    "check_exportable",
    "compare_onnx",
    "compare_tflite",
    "convert_quant_network",
    "export_float_tflite",
    "export_onnx",
    "export_tflite",
    "fake_quant",
    "fuse",
    "quant_report",
    "run_onnx",
    "run_tflite",
    "sensitivity",
    "strip_tflite_names",
    "tflite_interpreter",
]
