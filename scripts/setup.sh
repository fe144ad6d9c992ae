#!/usr/bin/env bash
# Create (or reuse) .venv and install graphattn with the extras named in $GRAPHATTN_EXTRAS.
# torch is pinned to 2.13.0 (the CPU build on this machine's disk) before any extra needing it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${GRAPHATTN_EXTRAS:-test}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [[ ",$EXTRAS," == *",hf,"* || ",$EXTRAS," == *",bench,"* ]]; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
