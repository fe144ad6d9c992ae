"""Which onnxruntime a graph is lowered for, and the oldest one that can run it.

The ``ort`` target may use a kernel input only where the stated onnxruntime accepts it. The
default is the newest release that both PyPI's ``onnxruntime`` and npm's ``onnxruntime-node`` /
``onnxruntime-web`` ship, so an export loads in Python, Node.js and the browser alike.
"""

from __future__ import annotations

import re

# Newest on PyPI *and* npm (onnxruntime-node/web 1.30.0, also inside transformers.js 4.3.1).
DEFAULT_ORT_VERSION = "1.30"
# The oldest release graphattn lowers for and tests (opset-23 Attention, GQA attention_bias).
OLDEST_ORT_VERSION = "1.30"
# GroupQueryAttention's ``query_seqlens`` input (a batch continuing several tokens after a
# past in one call): onnxruntime 1.32 and newer; 1.30's kernel takes at most 16 inputs.
QUERY_SEQLENS_SINCE = "1.32"
# GroupQueryAttention's ``head_sink`` input (attention sinks, GPT-OSS): present, with a CPU
# kernel, in 1.30 and 1.32 (checked in tests/test_attention_sinks.py), so in every version
# graphattn lowers for; the lowering therefore needs no version check for it.
HEAD_SINK_SINCE = OLDEST_ORT_VERSION


def parse_version(text: str) -> tuple[int, int]:
    """``"1.30"`` or ``"1.30.1"`` → ``(1, 30)``; ValueError naming the text otherwise."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", str(text).strip())
    if match is None:
        raise ValueError(f"ort_version must look like 1.30, got {text!r}")
    return int(match[1]), int(match[2])


def check_ort_version(text: str) -> str:
    """The version as ``"X.Y"``, refusing one older than :data:`OLDEST_ORT_VERSION`."""
    version = parse_version(text)
    if version < parse_version(OLDEST_ORT_VERSION):
        raise ValueError(
            f"ort_version {text!r} is older than {OLDEST_ORT_VERSION}, the oldest onnxruntime"
            " graphattn lowers for"
        )
    return f"{version[0]}.{version[1]}"


def has_head_sink(ort_version: str) -> bool:
    """Whether GroupQueryAttention of ``ort_version`` takes ``head_sink``."""
    return parse_version(ort_version) >= parse_version(HEAD_SINK_SINCE)


def has_query_seqlens(ort_version: str) -> bool:
    """Whether GroupQueryAttention of ``ort_version`` takes ``query_seqlens``."""
    return parse_version(ort_version) >= parse_version(QUERY_SEQLENS_SINCE)
