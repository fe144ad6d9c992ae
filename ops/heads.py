"""Head layout changes and the output projection onto the vocabulary."""

import onnx_ir as ir

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter


@graphattn_function
def SplitHeads(x_BSC, heads: int):
    """x [B, S, heads * D] → [B, heads, S, D]."""
    heads_1 = op.Reshape(op.Constant(value_int=heads), [1])
    split_shape = op.Concat([0, 0], heads_1, [-1], axis=0)
    return op.Transpose(op.Reshape(x_BSC, split_shape), perm=[0, 2, 1, 3])


@graphattn_function
def MergeHeads(x_BHSD):
    """x [B, H, S, D] → [B, S, H * D]."""
    return op.Reshape(op.Transpose(x_BHSD, perm=[0, 2, 1, 3]), [0, 0, -1])


@graphattn_function
def LMHead(hidden_BSC, weight_VC):
    """logits [B, S, V] = hidden [B, S, C] · weightᵀ; weight [V, C] (may be the embeddings)."""
    flat_NC = op.Reshape(
        hidden_BSC, op.Concat([-1], op.Slice(op.Shape(hidden_BSC), [2], [3]), axis=0)
    )
    logits_NV = op.Gemm(flat_NC, weight_VC, transB=1)
    logits_shape = op.Concat(op.Slice(op.Shape(hidden_BSC), [0], [2]), [-1], axis=0)
    return op.Reshape(logits_NV, logits_shape)


def split_heads(g: GraphEmitter, x_BSC: ir.Value, *, heads: int, name: str) -> ir.Value:
    """Emit ``SplitHeads``: [B, S, heads * D] → [B, heads, S, D]."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    return g.call(SplitHeads, [x_BSC], {"heads": heads}, name=name)


def merge_heads(g: GraphEmitter, x_BHSD: ir.Value, *, name: str) -> ir.Value:
    """Emit ``MergeHeads``: [B, H, S, D] → [B, S, H * D]."""
    return g.call(MergeHeads, [x_BHSD], name=name)


def lm_head(g: GraphEmitter, hidden_BSC: ir.Value, weight_VC: ir.Value, *, name: str) -> ir.Value:
    """Emit ``LMHead``: logits [B, S, V] from hidden [B, S, C] and weight [V, C]."""
    return g.call(LMHead, [hidden_BSC, weight_VC], name=name)
