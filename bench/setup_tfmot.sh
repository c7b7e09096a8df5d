#!/usr/bin/env bash
# Creates .venv-tfmot for bench/tfmot_train_step.py: TensorFlow Model
# Optimization (tfmot) with Keras 2 (tf_keras), kept apart from keras-qat's
# own .venv. tfmot is never a dependency of keras-qat.
#
# Versions: TensorFlow and tf-keras 2.21.0, the release keras-qat uses, with
# tfmot 0.8.1, the newest release; quantize_model works with this set.
# The package is `tensorflow`, not `tensorflow-cpu`: tf-keras requires
# `tensorflow` by name, so asking for tensorflow-cpu installs both, two
# distributions writing the same `tensorflow/` package. `tensorflow` is also
# what keras-qat's .venv has, so both benchmarks run the same TensorFlow build.
# tfmot itself pins absl-py~=1.2 (so absl-py 1.x here).
#
# Usage: bash bench/setup_tfmot.sh   (then .venv-tfmot/bin/python ...)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-tfmot
TF_VERSION=2.21.0
PACKAGES=(
    "tensorflow==$TF_VERSION"
    "tf-keras==$TF_VERSION"
    "tensorflow-model-optimization==0.8.1"
    "numpy"
    "absl-py"
)
CHECK="
import os
os.environ['TF_USE_LEGACY_KERAS'] = '1'
import tensorflow as tf, tf_keras, tensorflow_model_optimization
assert tf.__version__ == '$TF_VERSION', tf.__version__
"

check() {
    TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -c "$CHECK" >/dev/null 2>&1
}

if [[ -x "$VENV/bin/python" ]] && check; then
    echo "$VENV is ready"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${PACKAGES[@]}"
if ! check; then
    echo "$VENV: import check failed:" >&2
    TF_CPP_MIN_LOG_LEVEL=2 "$VENV/bin/python" -c "$CHECK"
    exit 1
fi
echo "$VENV is ready"
