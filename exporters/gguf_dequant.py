"""Dequantize GGUF tensor data to float32 in NumPy.

F32/F16/BF16 and the 32-element block formats Q8_0, Q4_0, Q4_1 are decoded here (their block
layouts are also what the lossless int4/int8 path maps onto). Every other type the ``gguf``
package can dequantize (Q4_K, Q6_K, ...) goes through ``gguf.quants.dequantize``.

Block layouts (little-endian, 32 weights per block, along a row):
- Q8_0: fp16 scale d, 32 × int8 q            → w = d·q                       (34 bytes)
- Q4_0: fp16 scale d, 16 bytes of nibbles   → w = d·(q − 8)                 (18 bytes)
- Q4_1: fp16 scale d, fp16 min m, 16 bytes  → w = d·q + m                   (20 bytes)
The low nibbles of the 16 bytes are weights 0–15 of the block, the high nibbles 16–31.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _blocks(raw: np.ndarray, kind: str) -> np.ndarray:
    """[rows, bytes] uint8 → [rows, blocks, block_bytes]."""
    rows = raw.shape[0]
    return np.ascontiguousarray(raw).reshape(rows, -1, BLOCK_BYTES[kind])


def _fp16(blocks: np.ndarray, start: int) -> np.ndarray:
    """fp16 fields at byte ``start`` of every block, as float32 [rows, blocks, 1]."""
    return blocks[..., start : start + 2].copy().view(np.float16).astype(np.float32)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., 16] uint8 → [..., 32] uint8: low nibbles first, then high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def q8_0_parts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales [rows, blocks] float32, q [rows, blocks, 32] int8) of Q8_0 data."""
    blocks = _blocks(raw, "Q8_0")
    return _fp16(blocks, 0)[..., 0], blocks[..., 2:].view(np.int8)


def q4_parts(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(scales, q [rows, blocks, 32] uint8 in 0..15, mins or None) of Q4_0 / Q4_1 data."""
    blocks = _blocks(raw, kind)
    if kind == "Q4_0":
        return _fp16(blocks, 0)[..., 0], unpack_nibbles(blocks[..., 2:]), None
    return _fp16(blocks, 0)[..., 0], unpack_nibbles(blocks[..., 4:]), _fp16(blocks, 2)[..., 0]


def dequantize(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of ``shape`` (rows last-but-one, row length last) from GGUF tensor data."""
    if kind == "F32":
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    if kind == "F16":
        return np.asarray(raw).view(np.float16).astype(np.float32).reshape(shape)
    if kind == "BF16":
        bits = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if kind == "Q8_0":
        scales, q = q8_0_parts(raw)
        return (scales[..., None] * q.astype(np.float32)).reshape(shape)
    if kind in ("Q4_0", "Q4_1"):
        scales, q, mins = q4_parts(raw, kind)
        if mins is None:
            return (scales[..., None] * (q.astype(np.float32) - 8.0)).reshape(shape)
        return (scales[..., None] * q.astype(np.float32) + mins[..., None]).reshape(shape)
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError as error:  # pragma: no cover - the gguf extra is missing
        raise ValueError(f"tensor type {kind} needs the gguf package ({error})") from None
    try:
        values = quants.dequantize(np.asarray(raw), GGMLQuantizationType[kind])
    except (KeyError, NotImplementedError, quants.QuantError) as error:
        raise ValueError(f"tensor type {kind} is not supported ({error})") from None
    return np.asarray(values, dtype=np.float32).reshape(shape)
