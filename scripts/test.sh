#!/usr/bin/env bash
# The test command: set up .venv with the test extras, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAPHATTN_EXTRAS="${GRAPHATTN_EXTRAS:-test}" bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
