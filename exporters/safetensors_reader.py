"""Read safetensors checkpoints lazily, without torch: parse the header, memory-map one tensor
at a time, convert F16/BF16 to float32 in NumPy.

Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data. Every header entry is
checked against the file size before anything is read, so a corrupt file fails with its name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 by shifting into the high half
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_DIMS = 32  # NumPy 1.x's limit
_MAX_ELEMENTS = 2**60  # no tensor, not even an empty one, has more (NumPy cannot shape it)


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or does not match the config."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype (safetensors name), shape, absolute byte offset."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of one ``.safetensors`` file, validated against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors header (file shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path}: corrupt safetensors header (declares {header_len} header bytes,"
                f" file has {size})"
            )
        try:
            header = json.loads(file.read(header_len))
        # ValueError: JSONDecodeError, and ints past Python's 4300-digit limit;
        # RecursionError: brackets nested deeper than the decoder recurses
        except (ValueError, RecursionError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _natural(value: object) -> bool:
    """A JSON integer ≥ 0 (not a bool, float or string)."""
    return type(value) is int and value >= 0


def _entry(path: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    dtype = shape = offsets = None
    if isinstance(info, dict):
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(_natural(n) for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_natural(n) for n in offsets)
    ):
        raise CheckpointError(
            f"{path}: corrupt safetensors header entry for {name!r} (needs a dtype string, a"
            f" shape of at most {_MAX_DIMS} ints >= 0 and data_offsets [begin, end])"
        )
    if math.prod(n for n in shape if n) > _MAX_ELEMENTS:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, too many elements")
    if dtype not in _NUMPY_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    shape, (begin, end) = tuple(shape), offsets
    itemsize = np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    expected = math.prod(shape) * itemsize  # Python ints: no int64 wrap-around
    if end - begin != expected or data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} data [{begin}, {end}) does not fit its shape {list(shape)}"
            f" {dtype} or the file ({size} bytes)"
        )
    return TensorEntry(path, name, dtype, shape, data_start + begin, end - begin)


def load_float32(entry: TensorEntry) -> np.ndarray:
    """The tensor as a float32 array, read through a memory map that is released afterwards."""
    size = entry.path.stat().st_size
    if entry.offset < 0 or entry.offset + entry.nbytes > size:  # the file may have shrunk
        raise CheckpointError(
            f"{entry.path}: tensor {entry.name!r} data [{entry.offset},"
            f" {entry.offset + entry.nbytes}) lies outside the file ({size} bytes)"
        )
    if entry.nbytes == 0:
        return np.zeros(entry.shape, dtype=np.float32)
    raw = np.memmap(
        entry.path,
        dtype=_NUMPY_DTYPES[entry.dtype],
        mode="r",
        offset=entry.offset,
        shape=entry.shape,
    )
    try:
        if entry.dtype == "BF16":  # the float32 bits are the bf16 bits shifted up: one copy
            widened = raw.astype(np.uint32)
            widened <<= 16
            return widened.view(np.float32)
        return np.array(raw, dtype=np.float32)
    finally:
        del raw
