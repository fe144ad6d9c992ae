"""Read a model file's ``metadata_props`` without onnx and without loading the graph.

The runtime must check what an export needs (its oldest onnxruntime) *before* onnxruntime
tries to load it: a graph using a kernel input the installed onnxruntime lacks fails to load
with a schema error that names a node, not the cause. ``ModelProto`` is read at the protobuf
wire level, top-level fields only; the graph (field 7) is skipped over, not parsed.
"""

from __future__ import annotations

import re
from pathlib import Path

# ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}
_METADATA_FIELD = 14


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes | memoryview):
    """Yield (field number, wire type, value) of one protobuf message: ints for varint and
    fixed types, bytes for length-delimited fields."""
    at = 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = int.from_bytes(data[at : at + 8], "little"), at + 8
        elif wire == 5:
            value, at = int.from_bytes(data[at : at + 4], "little"), at + 4
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at : at + length], at + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if at > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def read_metadata(path: str | Path) -> dict[str, str]:
    """The model's metadata_props as a dict; ValueError when the file is not a model proto."""
    data = memoryview(Path(path).read_bytes())  # slices are views: the graph is not copied
    metadata = {}
    for number, wire, value in _fields(data):
        if number == _METADATA_FIELD and wire == 2:
            entry = {n: bytes(v) for n, w, v in _fields(value) if w == 2}
            metadata[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    return metadata


def version_tuple(text: str) -> tuple[int, ...]:
    """``"1.30.0"`` → ``(1, 30, 0)``; a suffix such as ``.dev1``, ``rc1`` or ``+cu12`` is
    ignored (``"1.32.0rc1"`` → ``(1, 32, 0)``)."""
    parts = []
    for piece in text.split("+")[0].split("."):
        leading = re.match(r"\d+", piece)
        if leading is None:
            break
        parts.append(int(leading[0]))
        if leading.end() < len(piece):  # "0rc1", "0-rc1": the digits before the suffix
            break
    return tuple(parts)
