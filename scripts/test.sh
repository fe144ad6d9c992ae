#!/usr/bin/env bash
# The test command: set up .venv with the test and hf extras (and .venv-ort130), lint, then
# run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAPHATTN_EXTRAS="${GRAPHATTN_EXTRAS:-test,hf}" bash scripts/setup.sh
bash scripts/setup_ort130.sh  # onnxruntime 1.30 beside it (tests/test_ort_version.py)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
