"""Packed sequences: several documents in one row, told apart by ``segment_ids``.

``segment_ids [B, T]`` int64 holds, for every slot of the row (the past and the new tokens,
like ``attention_mask``), the id of the document the token belongs to; 0 marks padding.
Ids are any positive integers; two slots are in one document exactly when their ids are
equal, so a packer gives each document of a row its own id and lays it out contiguously
(:func:`graphattn.runtime.packing.pack`: 1, 2, 3, ...). An ordinary batch is the case
``segment_ids = attention_mask`` (one document per row), and then both functions below
equal ``AttentionBias`` and ``PositionIds``.

With query ``i`` of ``S`` at slot ``T - S + i`` (the new tokens follow the past), key ``t``
is *kept* for it when

- both are in the same document: ``segment_ids[b, t] == segment_ids[b, T - S + i]``,
- the key is a token: ``segment_ids[b, t] != 0`` and ``attention_mask[b, t] == 1``,
- and the position rule of :mod:`graphattn.ops.masks` holds (``causal``: ``t`` at or before
  the query's slot; ``window = W``: fewer than ``W`` slots apart).

That is the block-diagonal causal mask. Document-wise positions restart at each document:
a token's position is the number of tokens of its own document at or before its slot, minus
one (pads get 0), so every document is rotated (RoPE) or placed (learned positions) as if it
were alone. Both functions cost ``O(B·S·T)``, as the bias itself does.
"""

import onnx_ir as ir
from onnxscript import BOOL, INT64

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.masks import KeepToBias, PositionKeep, _check_window


@graphattn_function
def DocumentKeep(segment_ids_BT, attention_mask_BT, input_ids_BS, causal: int, window: int):
    """keep [B, S, T] bool from ``segment_ids [B, T]`` and ``attention_mask [B, T]`` int64
    (``input_ids [B, S]``: any tensor whose dim 1 is the new length S). See the module
    docstring for the rule."""
    query_len_1 = op.Slice(op.Shape(input_ids_BS), [1], [2])
    key_len_1 = op.Slice(op.Shape(segment_ids_BT), [1], [2])
    keep_ST = PositionKeep(
        op.Squeeze(query_len_1), op.Squeeze(key_len_1), causal=causal, window=window
    )
    query_segments_BS = op.Slice(segment_ids_BT, op.Neg(query_len_1), [9223372036854775807], [1])
    same_BST = op.Equal(op.Unsqueeze(query_segments_BS, [2]), op.Unsqueeze(segment_ids_BT, [1]))
    zero = op.Constant(value_int=0)
    token_BT = op.And(op.Cast(attention_mask_BT, to=BOOL.dtype), op.Greater(segment_ids_BT, zero))
    in_document_BST = op.And(same_BST, op.Unsqueeze(token_BT, [1]))
    return op.And(in_document_BST, op.Unsqueeze(keep_ST, [0]))


@graphattn_function
def DocumentAttentionBias(
    segment_ids_BT, attention_mask_BT, input_ids_BS, causal: int, window: int
):
    """bias [B, 1, S, T] float32: 0 where :func:`DocumentKeep` keeps the key, MASKED_BIAS
    elsewhere (the block-diagonal causal mask of packed documents)."""
    keep_BST = DocumentKeep(
        segment_ids_BT, attention_mask_BT, input_ids_BS, causal=causal, window=window
    )
    return KeepToBias(op.Unsqueeze(keep_BST, [1]))


@graphattn_function
def DocumentPositionIds(segment_ids_BT, attention_mask_BT, input_ids_BS):
    """position_ids [B, S] int64 of the new tokens: each token's index among the tokens of
    its own document at or before it (restarting at every document; pads get 0)."""
    keep_BST = DocumentKeep(segment_ids_BT, attention_mask_BT, input_ids_BS, causal=1, window=0)
    count_BS = op.ReduceSum(op.Cast(keep_BST, to=INT64.dtype), [2], keepdims=0)
    one = op.Constant(value_int=1)
    zero = op.Constant(value_int=0)
    return op.Max(op.Sub(count_BS, one), zero)


def _check_ids(value: ir.Value, parameter: str) -> None:
    require_rank(value, 2, parameter)
    if value.type is not None and value.dtype not in (None, ir.DataType.INT64):
        raise ValueError(f"{parameter} must be int64, got {value.dtype}")


def document_attention_bias(
    g: GraphEmitter,
    segment_ids_BT: ir.Value,
    attention_mask_BT: ir.Value,
    input_ids_BS: ir.Value,
    *,
    causal: bool = True,
    window: int | None = None,
    name: str = "document_bias",
) -> ir.Value:
    """Emit ``DocumentAttentionBias``: bias ``[B, 1, S, T]`` float32 from ``segment_ids [B,
    T]`` and ``attention_mask [B, T]`` (int64) and ``input_ids [B, S]`` (its length)."""
    _check_ids(segment_ids_BT, "segment_ids")
    _check_ids(attention_mask_BT, "attention_mask")
    require_rank(input_ids_BS, 2, "input_ids")
    attributes = {"causal": int(bool(causal)), "window": _check_window(window)}
    return g.call(
        DocumentAttentionBias,
        [segment_ids_BT, attention_mask_BT, input_ids_BS],
        attributes,
        name=name,
    )


def document_position_ids(
    g: GraphEmitter,
    segment_ids_BT: ir.Value,
    attention_mask_BT: ir.Value,
    input_ids_BS: ir.Value,
    *,
    name: str = "position_ids",
) -> ir.Value:
    """Emit ``DocumentPositionIds``: position_ids ``[B, S]`` int64 restarting at every
    document of ``segment_ids [B, T]``."""
    _check_ids(segment_ids_BT, "segment_ids")
    _check_ids(attention_mask_BT, "attention_mask")
    require_rank(input_ids_BS, 2, "input_ids")
    return g.call(DocumentPositionIds, [segment_ids_BT, attention_mask_BT, input_ids_BS], name=name)


__all__ = ["document_attention_bias", "document_position_ids"]
