"""Weight-only int4/int8 quantization of MatMul weights.

- target ``ort``: ``MatMul(x, W)`` → ``com.microsoft.MatMulNBits(x, B, scales, zero_points)``;
  the output projection ``Gemm(h, E, transB=1)`` too when ``quantize_lm_head`` (E is already
  ``[N, K]``). Embedding Gathers are ``embeddings.py``'s job (GatherBlockQuantized).
- target ``portable``: ``MatMul(x, DequantizeLinear(Wq, scale, zero_point, axis=0,
  block_size))`` with int4/uint4 or uint8 weights — standard ONNX (opset 21+ blocked
  quantization); onnxruntime may fuse it back into MatMulNBits.

Weights come from the graph's initializers (quantized in NumPy, round-to-nearest,
asymmetric) or, when given, from ``prequantized`` blocks (lossless GGUF import).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphattn.compiler.blockquant import BlockQuantized, pack_matmul_nbits, quantize_columns
from graphattn.compiler.rewrite import (
    MS_DOMAIN,
    add_initializer,
    attribute,
    replace_node,
    take_over,
)

Prequantized = Mapping[str, Callable[[], BlockQuantized]]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return add_initializer(graph, ir.tensor(array, name=name))


def _weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(weight value, stored as [N, K]) if ``node`` is a MatMul/Gemm by a constant 2-D weight."""
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    if len(node.inputs[1].const_value.shape) != 2:
        return None
    if node.op_type == "MatMul" and node.domain == "":
        return node.inputs[1], False
    if node.op_type == "Gemm" and node.domain == "" and attribute(node, "transB", 0) == 1:
        if attribute(node, "transA", 0) or len(node.inputs) > 2 and node.inputs[2] is not None:
            return None
        if attribute(node, "alpha", 1.0) != 1.0:
            return None
        return node.inputs[1], True
    return None


def weight_blocks(
    weight: ir.Value,
    transposed: bool,
    bits: int,
    block_size: int,
    prequantized: Prequantized,
    symmetric: bool,
) -> BlockQuantized:
    """The blocks of a constant 2-D ``weight`` (``[K, N]``, or ``[N, K]`` when
    ``transposed``): its ``prequantized`` ones (a GGUF's, lossless) where given, else
    round-to-nearest ``quantize_columns``."""
    if weight.name in prequantized:
        return prequantized[weight.name]()
    array = weight.const_value.numpy().astype(np.float32)
    return quantize_columns(array.T if transposed else array, bits, block_size, symmetric)


def quantize_weights(
    model: ir.Model,
    *,
    bits: int,
    block_size: int,
    standard: bool,
    quantize_lm_head: bool,
    prequantized: Prequantized | None = None,
    accuracy_level: int = 0,
    symmetric: bool = False,
) -> int:
    """Quantize eligible MatMul/Gemm weights in place; returns how many were quantized.
    ``symmetric``: zero point 2^(bits−1) everywhere (see ``quantize_columns``)."""
    graph, prequantized, count = model.graph, prequantized or {}, 0
    for node in list(graph):
        found = _weight(node)
        if found is None:
            continue
        weight, transposed = found
        if transposed and not quantize_lm_head:
            continue
        k = weight.const_value.shape[1 if transposed else 0]
        if standard and k % block_size and weight.name not in prequantized:
            continue  # blocked DequantizeLinear needs whole blocks: this weight stays float
        quantized = weight_blocks(weight, transposed, bits, block_size, prequantized, symmetric)
        base = f"{weight.name}.q{quantized.bits}"
        if standard:
            _lower_standard(graph, node, quantized, base, transposed)
        else:
            b, scales, zp = pack_matmul_nbits(quantized)
            inputs = [
                node.inputs[0],
                _initializer(graph, f"{base}.B", b),
                _initializer(graph, f"{base}.scales", scales),
            ]
            if zp is not None:  # else the kernel's default zero point 2^(bits-1)
                inputs.append(_initializer(graph, f"{base}.zero_points", zp))
            attrs = {
                "K": quantized.k,
                "N": quantized.n,
                "bits": quantized.bits,
                "block_size": quantized.block_size,
                "accuracy_level": accuracy_level,
            }
            if quantized.mins is None:
                replace_node(graph, node, "MatMulNBits", inputs, attrs, domain=MS_DOMAIN)
            else:
                _matmul_nbits_with_offsets(graph, node, inputs, attrs, quantized, base)
        count += 1
    if count and not standard:
        graph.opset_imports[MS_DOMAIN] = 1
    for value in list(graph.initializers.values()):
        if not value.uses() and value not in graph.outputs:
            del graph.initializers[value.name]
    return count


def _matmul_nbits_with_offsets(
    graph: ir.Graph, node: ir.Node, inputs: list, attrs: dict, quantized: BlockQuantized, base: str
) -> None:
    """``x·W`` for ``W = (q − 0)·d + m`` per block (GGUF Q4_1), exactly and on the fast
    integer-zero-point kernel: ``MatMulNBits(x; q, d) + (x · E) · M`` where ``E [K, blocks]``
    is the 0/1 block indicator (so ``x · E`` sums each block of x) and ``M [blocks, N]``
    holds the offsets. Three nodes, any rank of x."""
    blocks, size = quantized.q.shape[1], quantized.block_size
    if quantized.k != blocks * size:
        raise ValueError(f"{base}: K={quantized.k} is not a whole number of {size}-blocks")
    x, scope = node.inputs[0], base  # the weight's name is unique; inlined node names are not
    indicator_name = f"block_indicator.{quantized.k}x{blocks}"
    if indicator_name in graph.initializers:
        indicator = graph.initializers[indicator_name]
    else:
        member = np.arange(quantized.k)[:, None] // size == np.arange(blocks)[None, :]
        indicator = _initializer(graph, indicator_name, member.astype(np.float32))
    offsets = _initializer(graph, f"{base}.offsets", np.ascontiguousarray(quantized.mins.T))
    main = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=f"{scope}/nbits")
    sums = ir.node("MatMul", [x, indicator], name=f"{scope}/block_sums")
    correction = ir.node("MatMul", [sums.outputs[0], offsets], name=f"{scope}/offsets")
    total = ir.node("Add", [main.outputs[0], correction.outputs[0]], name=f"{scope}/sum")
    new_nodes = [main, sums, correction, total]
    for new in new_nodes:
        new.outputs[0].name = new.name
    graph.insert_before(node, new_nodes)
    take_over(node.outputs[0], total.outputs[0])
    graph.remove(node, safe=True)


def _lower_standard(
    graph: ir.Graph, node: ir.Node, quantized: BlockQuantized, base: str, transposed: bool
) -> None:
    """Weight input replaced by DequantizeLinear(blocked uint4/uint8) — standard ONNX.

    The layout follows the consumer: MatMul reads ``[K, N]`` (blocks along axis 0), the
    transB Gemm ``[N, K]`` (blocks along axis 1)."""
    if quantized.k % quantized.block_size:
        raise ValueError(
            f"{base}: K={quantized.k} is not a multiple of block {quantized.block_size}"
        )
    zero = quantized.zero_points
    if zero.dtype != np.uint8:
        raise ValueError(f"{base}: float zero points have no standard DequantizeLinear form")
    q_NK = quantized.q.reshape(quantized.n, -1)
    scales, axis = quantized.scales, 1
    if not transposed:
        q_NK, scales, zero, axis = q_NK.T, scales.T, zero.T, 0
    dtype = ir.DataType.UINT4 if quantized.bits == 4 else ir.DataType.UINT8
    numpy_dtype = ml_dtypes.uint4 if quantized.bits == 4 else np.uint8
    tensors = (
        ir.tensor(
            np.ascontiguousarray(q_NK).astype(numpy_dtype), dtype=dtype, name=f"{base}.weight"
        ),
        ir.tensor(np.ascontiguousarray(scales, dtype=np.float32), name=f"{base}.scale"),
        ir.tensor(
            np.ascontiguousarray(zero).astype(numpy_dtype), dtype=dtype, name=f"{base}.zero_point"
        ),
    )
    values = [add_initializer(graph, t) for t in tensors]
    dequantized = ir.node(
        "DequantizeLinear",
        values,
        {"axis": axis, "block_size": quantized.block_size},
        name=f"{node.name}/dequantize",
    )
    dequantized.outputs[0].name = f"{base}.dequantized"
    graph.insert_before(node, dequantized)
    node.replace_input_with(1, dequantized.outputs[0])
