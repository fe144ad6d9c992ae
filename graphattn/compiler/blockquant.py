"""Weight-only block quantization in NumPy, in the layouts ONNX Runtime's ``MatMulNBits`` and
standard ``DequantizeLinear`` (blocked, opset 21+) read.

A weight ``W [K, N]`` (MatMul layout) is quantized per output column ``n`` in blocks of
``block_size`` consecutive inputs ``k``: ``W[k, n] ≈ (q - zero_point) · scale``.

MatMulNBits layout (``B [N, blocks, block_size·bits/8]`` uint8): column-major blocks; with 4
bits, byte j of a block holds element 2j in its low nibble and 2j+1 in its high nibble.
``scales [N, blocks]``; ``zero_points`` uint8 packed the same way (4 bits: two per byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockQuantized:
    """Quantized columns of a ``[K, N]`` weight: ``q [N, blocks, block_size]`` (uint8 levels),
    ``scales``/``zero_points [N, blocks]`` (float32 / uint8 or float32)."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int
    mins: np.ndarray | None = None  # [N, blocks] float32 offsets: w = (q − zp)·scale + min

    @property
    def n(self) -> int:
        """Output features."""
        return self.q.shape[0]

    def dequantize(self) -> np.ndarray:
        """``W [K, N]`` float32 as the kernels compute it."""
        values = self.q.astype(np.float32) - self.zero_points[..., None].astype(np.float32)
        values = values * self.scales[..., None]
        return values.reshape(self.n, -1)[:, : self.k].T.copy()


def quantize_columns(
    weight_KN: np.ndarray, bits: int, block_size: int, symmetric: bool = False
) -> BlockQuantized:
    """Round-to-nearest block quantization of ``W [K, N]`` (zero-padded along K).

    Asymmetric: each block's [min, max] (widened to hold 0) spans all ``2^bits`` levels.
    ``symmetric``: the zero point is ``2^(bits−1)`` everywhere (the kernels' default, so it
    needs no zero-point tensor) and the block's largest-magnitude weight lands exactly on
    the extreme level −2^(bits−1) (its scale takes that weight's sign)."""
    k, n = weight_KN.shape
    blocks = -(-k // block_size)
    grouped = np.zeros((n, blocks * block_size), dtype=np.float32)  # rows = output columns
    grouped[:, :k] = weight_KN.T
    grouped = grouped.reshape(n, blocks, block_size)
    top = (1 << bits) - 1
    if symmetric:
        middle = 1 << (bits - 1)
        index = np.abs(grouped).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(grouped, index, axis=-1)[..., 0]
        scales = (extreme / np.float32(-middle)).astype(np.float32)
        offsets = np.full(scales.shape, middle, dtype=np.uint8)
    else:
        low = np.minimum(grouped.min(axis=-1), np.float32(0.0))
        high = np.maximum(grouped.max(axis=-1), np.float32(0.0))
        scales = ((high - low) / np.float32(top)).astype(np.float32)
        offsets = None
    scales[scales == 0] = 1.0
    if offsets is None:
        offsets = np.clip(np.round(-low / scales), 0, top).astype(np.uint8)
    # q = clip(round(w / scale) + zero_point, 0, top), in place on the float32 copy
    grouped *= (np.float32(1.0) / scales)[..., None]
    np.round(grouped, out=grouped)
    grouped += offsets[..., None]
    np.clip(grouped, 0, top, out=grouped)
    return BlockQuantized(grouped.astype(np.uint8), scales, offsets, bits, block_size, k)


def pack_matmul_nbits(
    quantized: BlockQuantized,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, blocks, blob], scales float32 [N, blocks], zero_points uint8
    [N, ⌈blocks·bits/8⌉] or float32 [N, blocks]) for MatMulNBits;
    zero_points is None when every block uses the kernel's default ``2^(bits−1)`` (symmetric
    quantization, GGUF Q4_0 and Q8_0), so the input can be left out."""
    q, bits = quantized.q, quantized.bits
    n, blocks, _ = q.shape
    if bits == 8:
        packed = q.copy()
    else:
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = quantized.scales.astype(np.float32)
    zp = quantized.zero_points
    if zp.dtype != np.uint8:  # float zero points are passed as they are
        return packed, scales, zp.astype(np.float32)
    if np.all(zp == 1 << (bits - 1)):
        return packed, scales, None
    if bits == 4:
        if blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales, zp
