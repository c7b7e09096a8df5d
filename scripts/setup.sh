#!/usr/bin/env bash
# Creates .venv and installs keras-qat with its test extra (from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
