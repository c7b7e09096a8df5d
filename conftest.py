"""Names that docstring examples use (pytest --doctest-modules)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow turns its oneDNN kernels on by default on some x86 CPUs only; without them
# (seen on AMD EPYC) its Eigen CPU kernels cannot train a height-1 conv with a dilation or
# a stride along one axis only (Conv2DBackpropFilter, DepthwiseConv2dNative: "Current
# implementation only supports equal length strides"), which quantized Conv1D /
# DepthwiseConv1D layers are. See docs/known-limits.md.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_qat  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(np=np, tf=tf, keras=keras, kq=keras_qat)
