"""Packed sequences in the decoder builder: the ``segment_ids`` export option.

With it, :func:`graphattn.builder.build_decoder` takes ``segment_ids [batch_size,
total_sequence_length]`` int64 (the document id of every slot, 0 = padding; see
:mod:`graphattn.ops.documents`) instead of ``position_ids``: the positions of the new tokens
restart at every document (:func:`positions`) and every dense attention bias keeps each
query inside its own document (:func:`bias`; causality, sliding windows and ALiBi as
before; ALiBi's per-row key positions differ from the document positions by one constant
per query, which the softmax ignores). Sparse attention layers read ``attention_mask``
themselves and are refused.

The lowering sees a ``DocumentAttentionBias`` behind the blocks: GroupQueryAttention (whose
mask is padding only and which rotates by cache slot) declines them; opset-23 Attention and
the decomposed form take the bias as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from graphattn.ops import GraphEmitter
from graphattn.ops.documents import document_attention_bias, document_position_ids
from graphattn.spec import ModelConfig


def check_packable(cfg: ModelConfig) -> None:
    """Raise ValueError when a layer cannot take the document mask."""
    for index, layer in enumerate(cfg.layers):
        sparse = layer.attention.sparse
        if sparse is not None:
            raise ValueError(
                f"segment_ids: layer {index} is {sparse.kind} attention, which reads"
                " attention_mask itself and takes no document mask"
            )


def positions(
    g: GraphEmitter,
    cfg: ModelConfig,
    segment_ids_BT: ir.Value,
    attention_mask_BT: ir.Value,
    input_ids_BS: ir.Value,
) -> ir.Value:
    """position_ids ``[B, S]`` of the new tokens, restarting at every document (after
    checking that every layer can take the document mask)."""
    check_packable(cfg)
    return document_position_ids(
        g, segment_ids_BT, attention_mask_BT, input_ids_BS, name="document_positions"
    )


def bias(segment_ids_BT: ir.Value) -> Callable[..., ir.Value]:
    """An emitter with :func:`graphattn.ops.attention_bias`'s signature (``g, attention_mask,
    input_ids, *, causal, window, name``) that emits the document bias ``[B, 1, S, T]``."""

    def emit(g, attention_mask_BT, input_ids_BS, *, causal, window, name):
        return document_attention_bias(
            g,
            segment_ids_BT,
            attention_mask_BT,
            input_ids_BS,
            causal=causal,
            window=window,
            name=name.replace("attention_bias", "document_bias"),
        )

    return emit


__all__ = ["bias", "check_packable", "positions"]
