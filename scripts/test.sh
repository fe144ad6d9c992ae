#!/usr/bin/env bash
# The test command: set up .venv with the test, hf and ray extras, .venv-ort130 and the JavaScript
# examples' packages, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAPHATTN_EXTRAS="${GRAPHATTN_EXTRAS:-test,hf,ray}" bash scripts/setup.sh
bash scripts/setup_ort130.sh  # onnxruntime 1.30 beside it (tests/test_ort_version.py)
bash scripts/setup_js.sh  # chromium (apt-get) and npm ci in examples/* (the JS app tests)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q -rs "$@"  # -rs: every skip says why
