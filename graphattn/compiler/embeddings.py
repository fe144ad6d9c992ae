"""Block-quantized embedding tables for the ``ort`` target.

``Gather(E [V, C], ids)`` → ``com.microsoft.GatherBlockQuantized(data, ids, scales[, zp])``:
each row of ``E`` is quantized in blocks of ``block_size`` along C, the same round-to-nearest
as the MatMul weights (``E`` is quantized as the ``[C, V]`` matrix ``Eᵀ`` whose columns are
the rows). ``data`` is uint8 ``[V, C·bits/8]`` (4 bits: two per byte, low nibble first),
``scales [V, blocks]`` float32, ``zero_points`` uint8 ``[V, ⌈blocks·bits/8⌉]`` packed the
same way, left out when every block uses the kernel's default ``2^(bits−1)``.

Only tables whose C is a whole number of blocks are quantized; the others stay float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphattn.compiler.blockquant import BlockQuantized, pack_matmul_nbits, quantize_columns
from graphattn.compiler.rewrite import MS_DOMAIN, add_initializer, attribute, replace_node


def _table(node: ir.Node) -> ir.Value | None:
    """The float ``[V, C]`` table of a row-gathering ``Gather``, else None."""
    if node.op_type != "Gather" or node.domain != "" or attribute(node, "axis", 0) != 0:
        return None
    table = node.inputs[0]
    tensor = None if table is None else table.const_value
    if tensor is None or len(tensor.shape) != 2:
        return None
    if tensor.dtype != ir.DataType.FLOAT:  # int4/int8 graphs compute in float32
        return None
    return table


def pack_gather_block_quantized(
    quantized: BlockQuantized,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(data uint8 [V, C·bits/8], scales [V, blocks], zero_points or None) for
    GatherBlockQuantized, from row blocks ``q [V, blocks, block_size]``: MatMulNBits' layout
    with its blocks side by side (the same bytes, which is what lets a tied table share)."""
    packed, scales, zero = pack_matmul_nbits(quantized)
    return packed.reshape(packed.shape[0], -1), scales, zero


def _tied_output_projection(
    graph: ir.Graph, table: ir.Value, bits: int, block_size: int
) -> list | None:
    """[data, scales, zero_points or None] of the tied output projection's MatMulNBits, when
    the quantize pass already packed this very table (``{table}.q{bits}.B`` and friends, no
    GGUF block offsets): the embedding then shares its bytes instead of storing them again.
    ``data`` is a Reshape of ``B [V, blocks, blob]`` to ``[V, blocks·blob]``."""
    base = f"{table.name}.q{bits}"
    found = graph.initializers
    if f"{base}.B" not in found or f"{base}.offsets" in found:
        return None
    zero = found.get(f"{base}.zero_points")
    if zero is not None and zero.const_value.dtype != ir.DataType.UINT8:
        return None
    packed = found[f"{base}.B"]
    rows, blocks = packed.const_value.shape[:2]
    if blocks * block_size != table.const_value.shape[1]:
        return None  # e.g. GGUF blocks of another size than asked for
    shape = add_initializer(
        graph, ir.tensor(np.array([rows, -1], np.int64), name=f"{base}.rows_shape")
    )
    reshape = ir.node("Reshape", [packed, shape], name=f"{base}/as_rows")
    reshape.outputs[0].name = f"{base}.rows"
    graph.insert_before(next(iter(graph)), reshape)
    return [reshape.outputs[0], found[f"{base}.scales"], zero]


def quantize_embeddings(
    graph: ir.Graph,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    keep_float: set[str] = frozenset(),
) -> int:
    """Quantize every float embedding Gather in place (after the MatMul weights, so a tied
    table reuses the output projection's blocks); returns how many. Tables named in
    ``keep_float`` (a GGUF's own blocks, when they cannot be shared) stay float rather than
    being quantized a second time."""
    count = 0
    for node in list(graph):
        table = _table(node)
        if table is None or table.const_value.shape[1] % block_size:
            continue
        shared = _tied_output_projection(graph, table, bits, block_size)
        if shared is None and table.name in keep_float:
            continue
        if shared is None:
            rows_VC = table.const_value.numpy().astype(np.float32)
            quantized = quantize_columns(rows_VC.T, bits, block_size, symmetric)
            base = f"{table.name}.gather_q{bits}"
            shared = [
                None if array is None else add_initializer(graph, ir.tensor(array, name=name))
                for array, name in zip(
                    pack_gather_block_quantized(quantized),
                    (f"{base}.data", f"{base}.scales", f"{base}.zero_points"),
                )
            ]
        data, scales, zero = shared
        inputs = [data, node.inputs[1], scales] + ([zero] if zero is not None else [])
        attrs = {"bits": bits, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1}
        replace_node(graph, node, "GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN)
        if not table.uses():
            del graph.initializers[table.name]
        count += 1
    if count:
        graph.opset_imports[MS_DOMAIN] = 1
    return count
