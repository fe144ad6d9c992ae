#!/usr/bin/env bash
# A second venv, .venv-ort130, with onnxruntime 1.30.0: the newest release on npm
# (onnxruntime-node/web, transformers.js) and the default --ort-version. Tests run our runtime
# there on exports lowered for 1.30 and check that an export needing 1.32 is refused cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-ort130/bin/python ]; then
    "$PYTHON" -m venv .venv-ort130
fi
.venv-ort130/bin/python -m pip install --quiet --upgrade pip
.venv-ort130/bin/python -m pip install --quiet -e . "onnxruntime==1.30.0"
