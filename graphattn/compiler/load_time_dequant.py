"""Quantized storage, float compute: weights stored as int4/int8 blocks and dequantized by
plain ONNX nodes on initializers, which onnxruntime constant-folds once at session load.

For a MatMul weight ``W [K, N]`` the graph holds the block levels ``q [blocks, block_size,
N]`` (uint4/uint8; int4/int8 where every block uses the zero point 2^(bits−1)), the scales
``d [blocks, 1, N]`` (float16 where that is exact, as a GGUF's are, else float32) and, where
the blocks need them, zero points ``z`` (uint4/uint8, same shape as ``d``) or offsets ``m``
(GGUF Q4_1). The weight is rebuilt as

    Cast(q) [− Cast(z)] · Cast(d) [+ Cast(m)] → Reshape [blocks·block_size, N] [→ Slice K]

— the same float32 arithmetic, in the same order, as ``BlockQuantized.dequantize`` and the
GGUF dequantizer, so a GGUF's blocks give exactly the weights of its fp32 export. A table
read by rows (an embedding Gather, the output projection ``Gemm(h, E, transB=1)``) is laid
out ``[N, blocks, block_size]`` instead and rebuilt as ``[N, K]``; a tied table is rebuilt
once and read by both.

Every input of those nodes is an initializer, so onnxruntime (native and WASM) folds them
into float32 initializers at load (``graph_optimization_level`` basic or above): the MatMuls
then run at fp32 speed — for runtimes without a fast 4-bit kernel (onnxruntime-web) — while
the download stays near the quantized size. The pass runs after the compile pipeline's
optimizer, so the chains are saved as they are.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphattn.compiler.blockquant import BlockQuantized
from graphattn.compiler.quantize import Prequantized, weight_blocks
from graphattn.compiler.rewrite import add_initializer, attribute

WEIGHTS_KEY = "graphattn.weights"  # model metadata: how the weights are stored
DEQUANTIZE_AT_LOAD = "dequantize_at_load"

_STORAGE = {  # (bits, signed) → (ONNX type, NumPy type)
    (4, False): (ir.DataType.UINT4, ml_dtypes.uint4),
    (4, True): (ir.DataType.INT4, ml_dtypes.int4),
    (8, False): (ir.DataType.UINT8, np.uint8),
    (8, True): (ir.DataType.INT8, np.int8),
}


def _block_axis(
    node: ir.Node, index: int, quantize_lm_head: bool, quantize_embeddings: bool
) -> int | None:
    """The axis of the weight its blocks run along for this use (0: a ``[K, N]`` MatMul
    weight; 1: a table read by rows), or None when this use is not rewritten."""
    if node.domain != "":
        return None
    if node.op_type == "MatMul" and index == 1:
        return 0
    if node.op_type == "Gemm" and index == 1 and quantize_lm_head:
        return 1 if attribute(node, "transB", 0) else 0
    if node.op_type == "Gather" and index == 0 and quantize_embeddings:
        return 1 if attribute(node, "axis", 0) == 0 else None
    return None


def _exact_half(array: np.ndarray) -> np.ndarray:
    """``array`` as float16 when that loses nothing (GGUF scales are stored so), else float32."""
    array = np.asarray(array, dtype=np.float32)
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), array) else array


class _Chain:
    """Builds one weight's nodes and initializers under the scope ``base``."""

    def __init__(self, graph: ir.Graph, base: str) -> None:
        self.graph, self.base, self.nodes = graph, base, []

    def constant(self, suffix: str, array: np.ndarray, dtype: ir.DataType | None = None):
        tensor = ir.tensor(np.ascontiguousarray(array), dtype=dtype, name=f"{self.base}.{suffix}")
        return add_initializer(self.graph, tensor)

    def node(self, op_type: str, inputs: list, step: str, **attributes) -> ir.Value:
        new = ir.node(op_type, inputs, attributes, name=f"{self.base}/{step}")
        new.outputs[0].name = new.name
        self.nodes.append(new)
        return new.outputs[0]

    def as_float(self, value: ir.Value, step: str) -> ir.Value:
        if value.const_value.dtype == ir.DataType.FLOAT:
            return value
        return self.node("Cast", [value], step, to=ir.DataType.FLOAT)


def _layout(array: np.ndarray, axis: int) -> np.ndarray:
    """``[N, blocks, ·]`` (BlockQuantized's rows) → ``[blocks, ·, N]`` for a ``[K, N]`` weight
    (axis 0), unchanged for a table read by rows (axis 1)."""
    return array.transpose(1, 2, 0) if axis == 0 else array


def _folded_weight(graph: ir.Graph, blocks: BlockQuantized, axis: int, base: str, shape):
    """Nodes rebuilding the float32 weight of ``shape`` from ``blocks``; (nodes, output)."""
    chain, bits, zero = _Chain(graph, base), blocks.bits, blocks.zero_points
    k, n, padded = blocks.k, blocks.n, blocks.q.shape[1] * blocks.block_size
    if list(shape) != ([k, n] if axis == 0 else [n, k]):
        raise ValueError(f"{base}: blocks of K={k}, N={n} do not make a weight of shape {shape}")
    if zero.dtype != np.uint8:
        raise ValueError(f"{base}: float zero points are not supported here")
    middle = 1 << (bits - 1)
    signed = bool(np.all(zero == middle))  # levels − 2^(bits−1) fit the signed type
    levels = blocks.q.astype(np.int16) - middle if signed else blocks.q
    dtype, numpy_dtype = _STORAGE[bits, signed]
    q = chain.constant("q", _layout(levels, axis).astype(numpy_dtype), dtype)
    weight = chain.as_float(q, "cast")
    if not signed and np.any(zero):
        zero_dtype, zero_numpy = _STORAGE[bits, False]
        z = _layout(zero[..., None], axis).astype(zero_numpy)
        z = chain.constant("zero_points", z, zero_dtype)
        weight = chain.node("Sub", [weight, chain.as_float(z, "cast_zero_points")], "sub")
    d = chain.constant("scales", _layout(_exact_half(blocks.scales[..., None]), axis))
    weight = chain.node("Mul", [weight, chain.as_float(d, "cast_scales")], "mul")
    if blocks.mins is not None:
        m = chain.constant("offsets", _layout(_exact_half(blocks.mins[..., None]), axis))
        weight = chain.node("Add", [weight, chain.as_float(m, "cast_offsets")], "add")
    full = chain.constant("shape", np.array([padded, n] if axis == 0 else [n, padded], np.int64))
    weight = chain.node("Reshape", [weight, full], "reshape")
    if padded != k:  # quantize_columns pads K to whole blocks
        bounds = [
            chain.constant(name, np.array([v], np.int64))
            for name, v in (("starts", 0), ("ends", k), ("axes", axis))
        ]
        weight = chain.node("Slice", [weight, *bounds], "slice")
    return chain.nodes, weight


def dequantize_at_load(
    model: ir.Model,
    *,
    bits: int,
    block_size: int,
    quantize_lm_head: bool = True,
    quantize_embeddings: bool = True,
    prequantized: Prequantized | None = None,
    symmetric: bool = False,
) -> int:
    """Store every eligible float weight as ``bits``-bit blocks rebuilt at load (in place);
    returns how many. Eligible: a 2-D float32 initializer all of whose uses are MatMul
    weights, output-projection Gemm weights (``quantize_lm_head``) or embedding Gather tables
    (``quantize_embeddings``), all wanting the same block layout. ``prequantized`` blocks
    (a GGUF's, lossless) are used as they are, else round-to-nearest ``quantize_columns``."""
    graph, prequantized, count = model.graph, prequantized or {}, 0
    order = {node: index for index, node in enumerate(graph)}
    outputs = set(graph.outputs)
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if value in outputs or tensor is None or len(tensor.shape) != 2:
            continue
        if tensor.dtype != ir.DataType.FLOAT:
            continue
        uses = list(value.uses())
        axes = {_block_axis(u.node, u.idx, quantize_lm_head, quantize_embeddings) for u in uses}
        if not uses or None in axes or len(axes) != 1:
            continue
        (axis,) = axes
        blocks = weight_blocks(value, axis == 1, bits, block_size, prequantized, symmetric)
        base = f"{value.name}.q{blocks.bits}"
        nodes, folded = _folded_weight(graph, blocks, axis, base, tensor.shape)
        first = min((u.node for u in uses), key=order.__getitem__)
        graph.insert_before(first, nodes)
        for use in uses:
            use.node.replace_input_with(use.idx, folded)
        del graph.initializers[value.name]
        count += 1
    if count:
        model.metadata_props[WEIGHTS_KEY] = DEQUANTIZE_AT_LOAD
    return count
