"""A small GGUF (v2/v3) parser: metadata and tensor directory, tensor data memory-mapped.

Layout (little-endian): ``GGUF`` magic, u32 version, u64 tensor count, u64 key/value count;
key/value pairs (u64-length UTF-8 key, u32 value type, value; arrays are u32 element type,
u64 count, elements); tensor infos (name, u32 dims, u64 sizes innermost first, u32 ggml
type, u64 offset); padding to ``general.alignment`` (default 32); tensor data.

Parsing this directly is ~30× faster than building ``gguf.GGUFReader`` (which makes a NumPy
view per string), and needs no package for the types decoded in ``gguf_dequant``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
MAX_ARRAY_DEPTH = 8  # arrays of arrays, nested deeper than this, are refused (not recursed into)
MAX_ELEMENTS = 2**60  # no tensor, not even an empty one, has more (NumPy cannot shape it)
# ggml type id → (name, elements per block, bytes per block) for the types decoded here.
NATIVE_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the directory: ``shape`` rows first (the reverse of GGUF's order)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    block: tuple[int, int]  # (elements, bytes) per block


def _type_table(type_id: int) -> tuple[str, int, int]:
    if type_id in NATIVE_TYPES:
        return NATIVE_TYPES[type_id]
    try:  # other types: sizes from the gguf package, when installed
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        kind = GGMLQuantizationType(type_id)
        elements, size = GGML_QUANT_SIZES[kind]
        return kind.name, elements, size
    except (ImportError, ValueError, KeyError):
        return f"type#{type_id}", 0, 0


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.data):
            raise GGUFFormatError(f"string of {length} bytes runs past the end of the file")
        text = bytes(self.data[self.pos : self.pos + length]).decode("utf-8")
        self.pos += length
        return text

    def value(self, value_type: int, depth: int = 0):
        if value_type in _SCALARS:
            return self.take(_SCALARS[value_type])
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFFormatError(f"metadata arrays nested more than {MAX_ARRAY_DEPTH} deep")
            element_type, count = self.take("<I"), self.take("<Q")
            if count > len(self.data) - self.pos:  # every element takes at least one byte
                raise GGUFFormatError(f"array of {count} elements is larger than the file")
            return [self.value(element_type, depth + 1) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {value_type}")


@dataclass
class GGUFFile:
    """Parsed metadata and tensor directory of one file; ``array(info)`` maps tensor data."""

    path: Path
    version: int
    fields: dict
    tensors: list[TensorInfo]

    def array(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes memory-mapped: float types typed, block types ``[rows, bytes]``.

        GGUFFormatError for a type whose size is unknown, or data no longer inside the file."""
        elements, block_bytes = info.block
        if not elements:
            raise GGUFFormatError(
                f"tensor {info.name!r} has type {info.kind}, whose block size is unknown"
                " (install the gguf extra for more types)"
            )
        size = self.path.stat().st_size
        if info.offset + info.nbytes > size:  # checked at parse time; the file may have shrunk
            raise GGUFFormatError(
                f"tensor {info.name!r} data [{info.offset}, {info.offset + info.nbytes})"
                f" lies outside the file ({size} bytes)"
            )
        typed = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}.get(info.kind)
        rows = math.prod(info.shape[:-1])
        row_bytes = info.shape[-1] // elements * block_bytes if info.shape else block_bytes
        if info.nbytes == 0:  # an empty tensor: nothing to map (mmap refuses length 0)
            return np.zeros(info.shape if typed else (rows, row_bytes), typed or np.uint8)
        raw = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,)
        )
        if typed is not None:
            return raw.view(typed).reshape(info.shape)
        return raw.reshape(rows, row_bytes)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path``; GGUFFormatError (with the reason) if it is not a valid GGUF file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        data = np.memmap(file, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    view = memoryview(data)
    try:
        return _parse(path, _Cursor(view), size)
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as error:
        raise GGUFFormatError(f"truncated or corrupt ({error})") from None


def _parse(path: Path, cursor: _Cursor, size: int) -> GGUFFile:
    if size < 24 or bytes(cursor.data[:4]) != b"GGUF":
        raise GGUFFormatError("no GGUF magic at the start of the file")
    cursor.pos = 4
    version = cursor.take("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 or 3)")
    tensor_count, field_count = cursor.take("<Q"), cursor.take("<Q")
    if tensor_count > size or field_count > size:
        raise GGUFFormatError("tensor or metadata counts larger than the file")
    fields = {}
    for _ in range(field_count):
        key = cursor.string()
        fields[key] = cursor.value(cursor.take("<I"))
    directory = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.take("<I")
        if dims > 8:
            raise GGUFFormatError(f"tensor {name!r} has {dims} dimensions")
        sizes = [cursor.take("<Q") for _ in range(dims)]
        type_id, offset = cursor.take("<I"), cursor.take("<Q")
        directory.append((name, sizes, type_id, offset))
    alignment = fields.get("general.alignment", 32)
    # llama.cpp refuses any alignment that is not a power of two, too
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise GGUFFormatError(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, sizes, type_id, offset in directory:
        kind, block_elements, block_bytes = _type_table(type_id)
        if math.prod(s for s in sizes if s) > MAX_ELEMENTS:
            raise GGUFFormatError(f"tensor {name!r} has dimensions {sizes}, too many elements")
        elements = math.prod(sizes)  # Python ints: no int64 wrap-around
        nbytes = elements // block_elements * block_bytes if block_elements else 0
        start = data_start + offset
        if block_elements > 1 and (not sizes or sizes[0] % block_elements):
            raise GGUFFormatError(
                f"tensor {name!r} rows of {sizes[0] if sizes else 1} elements are not whole"
                f" {kind} blocks of {block_elements}"
            )
        if start + nbytes > size:  # types of unknown size (nbytes 0) must start inside, too
            raise GGUFFormatError(f"tensor {name!r} data does not fit the file")
        shape = tuple(int(s) for s in reversed(sizes))
        tensors.append(TensorInfo(name, kind, shape, start, nbytes, (block_elements, block_bytes)))
    return GGUFFile(path, version, fields, tensors)
