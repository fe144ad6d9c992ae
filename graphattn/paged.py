"""A paged KV cache in the decoder builder: the ``kv_layout="paged"`` export option.

With it, :func:`graphattn.builder.build_decoder` takes (instead of ``attention_mask`` and a
contiguous cache per layer)::

    input_ids      [batch_size, sequence_length]  int64  each row's new tokens, LEFT-padded
    position_ids   [batch_size, sequence_length]  int64  past_lengths[b] + index among real; pads 0
    block_table    [batch_size, max_blocks]       int64  row b's pool blocks in logical order
    past_lengths   [batch_size]                   int64  tokens of row b already in the pool
    query_lengths  [batch_size]                   int64  real new tokens of row b (>= 1)
    past_key_values.{i}.key|value [num_blocks, kv_heads, kv_block_size, head_dim]  (the pool)

and outputs ``logits`` as before and ``present.{i}.key|value [batch_size, kv_heads,
sequence_length, head_dim]``: only the new tokens' K/V (rotated and normed as stored), in the
same left-padded layout; the runtime writes the real ones into its pool. Each layer's past is
the pool read through the block table (:func:`graphattn.ops.paged.PagedKV`, ``[B, Hkv,
max_blocks·bs, D]``); the attention block concatenates its new keys to it as it does to a
contiguous past, and the bias (:func:`graphattn.ops.paged.PagedAttentionBias`, one per
(causal, window)) keeps each row's real pool slots and its real new tokens, causal and
windowed by logical position. The presents are the last ``sequence_length`` positions of the
block's concatenation.

Refused, with the layer and the feature named: multi-head latent attention (its cache is a
latent, not key/value), sparse attention (it reads ``attention_mask`` and gathers the cache
itself), ALiBi (its bias needs every key's position among the row's tokens), and packed
sequences (``segment_ids``). The export pipeline also refuses encoders and the transformers.js
layout (:func:`check_export`).

Lowering: on ``ort`` GroupQueryAttention declines a paged block (its kernel reads a
contiguous cache with one length per row derived from shapes, and the CPU kernel refuses a
batch of several rows continuing after a past); it becomes opset-23 Attention like on
``portable``, while the rest of the graph keeps the ort fusions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn.ops import GraphEmitter
from graphattn.ops.paged import paged_attention_bias, paged_kv
from graphattn.spec import BATCH, SEQUENCE, ModelConfig

KV_LAYOUTS = ("contiguous", "paged")
DEFAULT_KV_BLOCK_SIZE = 16
KV_LAYOUT_KEY = "graphattn.kv_layout"  # "paged" (absent: contiguous)
KV_BLOCK_SIZE_KEY = "graphattn.kv_block_size"  # slots per pool block, e.g. "16"
BLOCKS = "max_blocks"
NUM_BLOCKS = "num_blocks"
INT64 = ir.DataType.INT64


def check_layout(kv_layout: str, kv_block_size: int) -> None:
    """Raise ValueError for an unknown layout or a bad block size."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {kv_layout!r}")
    if isinstance(kv_block_size, bool) or not isinstance(kv_block_size, int) or kv_block_size < 1:
        raise ValueError(f"kv_block_size must be an int >= 1, got {kv_block_size!r}")


def check_export(*, encoder: bool, layout: str, segment_ids: bool = False) -> None:
    """The export-level refusals of ``kv_layout="paged"``."""
    if encoder:
        raise ValueError("kv_layout='paged' is for decoders: an encoder has no KV cache")
    if layout == "transformers.js":
        raise ValueError(
            "kv_layout='paged' does not fit the transformers.js layout: transformers.js feeds"
            " attention_mask and a contiguous past_key_values cache"
        )
    if segment_ids:
        raise ValueError(
            "kv_layout='paged' with segment_ids (packed sequences) is not supported: the paged"
            " mask is one sequence per row"
        )


def check_pageable(cfg: ModelConfig) -> None:
    """Raise ValueError naming the layer and the feature where a layer cannot read a pool."""
    for index, layer in enumerate(cfg.layers):
        spec = layer.attention
        feature = None
        if spec.latent is not None:
            feature = (
                "multi-head latent attention (MLA): its cache is a latent and a rope key,"
                " not key/value blocks"
            )
        elif spec.sparse is not None:
            feature = (
                f"{spec.sparse.kind.replace('_', ' ')} attention: it reads attention_mask and"
                " gathers its cache itself"
            )
        elif spec.alibi_slopes is not None:
            feature = "ALiBi: its bias needs the keys' positions among the row's tokens"
        if feature is not None:
            raise ValueError(f"kv_layout='paged': layer {index} is {feature}; not supported")


@dataclass(frozen=True)
class PagedInputs:
    """The paged graph's inputs, and each layer's past read from its pool."""

    input_ids: ir.Value
    position_ids: ir.Value
    block_table: ir.Value
    past_lengths: ir.Value
    query_lengths: ir.Value
    pasts: list[tuple[ir.Value, ir.Value]]
    block_size: int
    new_slice: tuple[ir.Value, ir.Value, ir.Value]  # Slice starts, ends, axes: the last S

    @classmethod
    def declare(
        cls, g: GraphEmitter, cfg: ModelConfig, dtype: ir.DataType, block_size: int
    ) -> PagedInputs:
        """Declare the inputs (after refusing what cannot be paged) and read every pool."""
        check_layout("paged", block_size)
        check_pageable(cfg)
        input_ids = g.input("input_ids", INT64, [BATCH, SEQUENCE])
        position_ids = g.input("position_ids", INT64, [BATCH, SEQUENCE])
        block_table = g.input("block_table", INT64, [BATCH, BLOCKS])
        past_lengths = g.input("past_lengths", INT64, [BATCH])
        query_lengths = g.input("query_lengths", INT64, [BATCH])
        pools = []
        for i, layer in enumerate(cfg.layers):
            spec = layer.attention
            dims = [NUM_BLOCKS, spec.kv_heads, block_size, spec.head_dim]
            pools.append(
                tuple(
                    g.input(f"past_key_values.{i}.{name}", dtype, dims) for name in ("key", "value")
                )
            )
        pasts = [
            tuple(
                paged_kv(g, pool, block_table, name=f"layers.{i}/paged_{name}")
                for pool, name in zip(layer_pools, ("key", "value"))
            )
            for i, layer_pools in enumerate(pools)
        ]
        length = g.op("Shape", [input_ids], {"start": 1, "end": 2}, name="paged/new_length")
        new_slice = (
            g.op("Neg", [length], name="paged/new_start"),
            g.initializer("paged.new_end", np.array([np.iinfo(np.int64).max], np.int64)),
            g.initializer("paged.time_axis", np.array([2], np.int64)),
        )
        return cls(
            input_ids, position_ids, block_table, past_lengths, query_lengths, pasts, block_size,
            new_slice,
        )  # fmt: skip

    def bias(self) -> Callable[..., ir.Value]:
        """An emitter with :func:`graphattn.ops.attention_bias`'s signature (``g,
        attention_mask, input_ids, *, causal, window, name``; the mask is None here) that
        emits the paged bias ``[B, 1, S, max_blocks·bs + S]``."""

        def emit(g, attention_mask_BT, input_ids_BS, *, causal, window, name):
            return paged_attention_bias(
                g,
                self.past_lengths,
                self.query_lengths,
                input_ids_BS,
                self.block_table,
                block_size=self.block_size,
                causal=causal,
                window=window,
                name=name.replace("attention_bias", "paged_bias"),
            )

        return emit

    def new_tokens(self, g: GraphEmitter, present: ir.Value, name: str) -> ir.Value:
        """The last ``sequence_length`` positions of a block's present ``[B, Hkv, P + S, D]``:
        the new tokens' keys or values ``[B, Hkv, S, D]``."""
        start, end, axis = self.new_slice
        return g.op("Slice", [present, start, end, axis], name=name)


def metadata(block_size: int) -> dict[str, str]:
    """The model metadata of a paged graph."""
    return {KV_LAYOUT_KEY: "paged", KV_BLOCK_SIZE_KEY: str(block_size)}


GENAI_NOTE = (
    "not supported: kv_layout paged (a pool of blocks per layer read through block_table,"
    " per-row past_lengths/query_lengths, presents of the new tokens only); GenAI allocates"
    " a contiguous [batch, num_key_value_heads, T, head_size] cache and feeds attention_mask."
    " Run it with graphattn.runtime's engine"
)


def mark_genai_config(config: dict, block_size: int) -> dict:
    """Mark a paged export's ``genai_config.json`` (in place; also returned): top-level
    string keys (GenAI ignores those) say the layout and that GenAI cannot run it; the rest
    (eos ids, context length, sizes) stays for our runtime."""
    config[KV_LAYOUT_KEY] = "paged"
    config[KV_BLOCK_SIZE_KEY] = str(block_size)
    config["graphattn.onnxruntime_genai"] = GENAI_NOTE
    return config


__all__ = [
    "DEFAULT_KV_BLOCK_SIZE",
    "KV_BLOCK_SIZE_KEY",
    "KV_LAYOUTS",
    "KV_LAYOUT_KEY",
    "PagedInputs",
    "check_export",
    "check_layout",
    "check_pageable",
    "mark_genai_config",
    "metadata",
]
