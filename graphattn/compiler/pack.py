"""Pack MatMuls that read the same input (q/k/v projections; gate/up) into one MatMul over
concatenated weights followed by a Split: fewer, larger matrix products for the same math.

The packed weight is lazy (concatenated when written or quantized), so export memory stays
low; GGUF blocks of the parts, when given, are concatenated the same way (lossless).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from graphattn.compiler.blockquant import BlockQuantized
from graphattn.compiler.rewrite import add_initializer, take_over


def _eligible(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
        return False
    weight = node.inputs[1].const_value
    return weight is not None and len(weight.shape) == 2


def concat_blocks(parts: list[BlockQuantized]) -> BlockQuantized:
    """Blocks of weights side by side along N (same K, bits and block size)."""
    first = parts[0]
    mins = None
    if any(p.mins is not None for p in parts):
        mins = np.concatenate(
            [p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts]
        )
    zero_dtype = np.result_type(*(p.zero_points.dtype for p in parts))
    return BlockQuantized(
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.zero_points.astype(zero_dtype) for p in parts]),
        first.bits,
        first.block_size,
        first.k,
        mins,
    )


def _packed_name(names: list[str]) -> str:
    tails = [n.rsplit(".", 2)[-2] if n.count(".") >= 2 else n for n in names[1:]]
    return "+".join([names[0], *tails])


def pack_matmuls(graph: ir.Graph, prequantized: dict | None = None, min_group: int = 2) -> int:
    """Pack every group of ≥ ``min_group`` MatMuls sharing an input; returns how many."""
    groups: dict[ir.Value, list[ir.Node]] = defaultdict(list)
    for node in graph:
        if _eligible(node):
            groups[node.inputs[0]].append(node)
    packed = 0
    for x, nodes in groups.items():
        weights = [n.inputs[1] for n in nodes]
        tensors = [w.const_value for w in weights]
        if len(nodes) < min_group or len({(t.shape[0], t.dtype) for t in tensors}) != 1:
            continue
        names = [w.name for w in weights]
        blocks = None
        if prequantized is not None and any(n in prequantized for n in names):
            if not all(n in prequantized for n in names):
                continue  # mixed lossless / re-quantized parts: keep them apart
            blocks = [prequantized[n]() for n in names]
            if len({(b.bits, b.block_size) for b in blocks}) != 1:
                continue  # e.g. Q8_0 beside Q4_1: different kernels
        widths = [int(t.shape[1]) for t in tensors]
        name = _packed_name(names)

        def load(tensors=tensors, name=name) -> ir.Tensor:
            return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=1), name=name)

        shape = ir.Shape([tensors[0].shape[0], sum(widths)])
        lazy = ir.LazyTensor(load, dtype=tensors[0].dtype, shape=shape, name=name)
        weight = add_initializer(graph, lazy)
        sizes = ir.tensor(np.array(widths, dtype=np.int64), name=f"{name}.split")
        split_sizes = add_initializer(graph, sizes)
        scope = f"{nodes[0].name}/packed"
        matmul = ir.node("MatMul", [x, weight], name=scope)
        matmul.outputs[0].name = f"{name}/output"
        split = ir.node(
            "Split",
            [matmul.outputs[0], split_sizes],
            {"axis": -1},
            num_outputs=len(nodes),
            name=f"{scope}/split",
        )
        graph.insert_before(nodes[0], [matmul, split])
        for node, part in zip(nodes, split.outputs):
            take_over(node.outputs[0], part)
            graph.remove(node, safe=True)
        for value in weights:
            if not value.uses():
                del graph.initializers[value.name]
        if blocks is not None:
            prequantized[name] = lambda blocks=blocks: concat_blocks(blocks)
        packed += 1
    return packed
