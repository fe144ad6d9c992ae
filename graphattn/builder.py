"""The decoder builder: one straight loop over layers composing :mod:`graphattn.layers`.

I/O follows Optimum / ONNX Runtime GenAI so their apps run our files unchanged:
``input_ids [batch_size, sequence_length]``, ``attention_mask [batch_size,
total_sequence_length]``, ``position_ids [batch_size, sequence_length]`` (int64),
``past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length, head_dim]`` →
``logits [batch_size, sequence_length, vocab]``, ``present.{i}.key|value [batch_size, kv_heads,
total_sequence_length, head_dim]``. Each layer's cache tensors are its
:attr:`~graphattn.spec.AttentionSpec.cache` (MLA: ``past_key_values.{i}.latent [batch_size,
past_sequence_length, kv_lora_rank]`` and ``.rope_key [batch_size, past_sequence_length,
qk_rope_head_dim]``, presents likewise with ``total_sequence_length``). The symbolic dims
carry exactly those names (transformers.js builds its empty cache from them and resolves only
``batch_size``).

Shared per graph: one attention bias per distinct (causal, window) and one cos/sin pair per
distinct RoPE (Gemma 3's local and global layers rotate with different bases). Sparse layers
(:class:`~graphattn.spec.SparseSpec`) read ``attention_mask`` instead of a bias; a
``sparse_routed`` layer also reads the RoPE tables of *every* slot ``[B, T, R]``, at the
positions ``cumsum(attention_mask) - 1`` (the rule ``position_ids`` follow; pads 0), since
it rotates the cached keys it gathers at their own positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphattn import __version__, ops, packing
from graphattn import paged as paged_layout
from graphattn.layers import LayerInputs, Weights, decoder_layer, final_logits, norm, scaled
from graphattn.ops import GraphEmitter
from graphattn.rope import rope_cos_sin
from graphattn.spec import BATCH, CONTEXT_KEY, PAST, SEQUENCE, TOTAL, ModelConfig

INT64 = ir.DataType.INT64


def build_decoder(
    cfg: ModelConfig,
    tensors: Mapping[str, ir.TensorProtocol],
    *,
    dtype: ir.DataType = ir.DataType.FLOAT,
    last_logits_only: bool = False,
    segment_ids: bool = False,
    kv_layout: str = "contiguous",
    kv_block_size: int = paged_layout.DEFAULT_KV_BLOCK_SIZE,
) -> ir.Model:
    """The decoder graph for ``cfg``; ``tensors`` maps builder roles to (lazy) weight tensors.

    ``dtype`` is the float type of the weights, KV cache and logits (FLOAT or FLOAT16).
    ``last_logits_only``: logits ``[batch_size, 1, vocab]`` for the last position only
    (prefill skips the output projection of every other position); else ``[batch_size,
    sequence_length, vocab]``.
    ``segment_ids``: packed sequences (:mod:`graphattn.ops.documents`): an input ``segment_ids
    [batch_size, total_sequence_length]`` int64 (document id per slot, 0 = padding) replaces
    ``position_ids``; the graph computes the positions (restarting at each document) and the
    block-diagonal causal bias from it. Not with sparse attention layers.
    ``kv_layout``: ``contiguous`` (the cache above) or ``paged`` (:mod:`graphattn.paged`:
    a pool of ``kv_block_size``-slot blocks per layer read through ``block_table``, per-row
    ``past_lengths``/``query_lengths`` instead of ``attention_mask``, presents of the new
    tokens only).
    """
    paged_layout.check_layout(kv_layout, kv_block_size)
    g = GraphEmitter(f"{cfg.model_type}_decoder")
    w = Weights(g, tensors)
    paged = segments = None
    if kv_layout == "paged":
        if segment_ids:
            paged_layout.check_export(encoder=False, layout="genai", segment_ids=True)
        paged = paged_layout.PagedInputs.declare(g, cfg, dtype, kv_block_size)
        input_ids, attention_mask, position_ids = paged.input_ids, None, paged.position_ids
        pasts = paged.pasts
    else:
        input_ids = g.input("input_ids", INT64, [BATCH, SEQUENCE])
        attention_mask = g.input("attention_mask", INT64, [BATCH, TOTAL])
        segments = g.input("segment_ids", INT64, [BATCH, TOTAL]) if segment_ids else None
        if segments is None:
            position_ids = g.input("position_ids", INT64, [BATCH, SEQUENCE])
        else:
            position_ids = packing.positions(g, cfg, segments, attention_mask, input_ids)
        pasts = [
            tuple(
                g.input(f"past_key_values.{i}.{name}", dtype, list(dims))
                for name, dims in layer.attention.cache
            )
            for i, layer in enumerate(cfg.layers)
        ]
    make_bias = ops.attention_bias if segments is None else packing.bias(segments)
    if paged is not None:
        make_bias = paged.bias()

    hidden = g.op("Gather", [w["embed_tokens"], input_ids], name="embed_tokens")
    hidden = scaled(g, w, hidden, cfg.embedding_scale, "embed_scale")
    if cfg.positions == "learned":
        placed = g.op("Gather", [w["embed_positions"], position_ids], name="embed_positions")
        hidden = g.op("Add", [hidden, placed], name="embed")

    if cfg.embedding_norm is not None:
        hidden = norm(g, cfg.embedding_norm, hidden, w, "embed_norm", "embed_norm", cfg.hidden_size)
    biases: dict[tuple, ir.Value] = {}
    rotations: dict[tuple, tuple[ir.Value, ir.Value]] = {}
    every_slot: dict[tuple, tuple[ir.Value, ir.Value]] = {}
    positions_all = None
    presents = []
    for i, layer in enumerate(cfg.layers):
        spec = layer.attention
        mask_key = (spec.causal, spec.window, spec.alibi_slopes)
        if spec.sparse is not None:
            mask_key = None
        elif mask_key not in biases:
            suffix = "" if not biases else f"_{len(biases)}"
            bias = make_bias(
                g,
                attention_mask,
                input_ids,
                causal=spec.causal,
                window=spec.window,
                name=f"attention_bias{suffix}",
            )
            if spec.alibi_slopes is not None:
                slopes = g.initializer(
                    f"alibi{suffix}.slopes", np.array(spec.alibi_slopes, np.float32)
                )
                alibi = ops.alibi_bias(g, attention_mask, slopes, name=f"alibi{suffix}")
                bias = g.op("Add", [bias, alibi], name=f"alibi{suffix}/with_mask")
            biases[mask_key] = bias
        cos_sin = cos_sin_all = None
        routed = spec.sparse is not None and spec.sparse.kind == "sparse_routed"
        if routed:
            if positions_all is None:  # the mask as the "input_ids": positions of all T slots
                positions_all = ops.position_ids_from_mask(
                    g, attention_mask, attention_mask, name="positions_all"
                )
            if spec.rope.key not in every_slot:
                suffix = "" if not every_slot else f"_{len(every_slot)}"
                every_slot[spec.rope.key] = rope_cos_sin(
                    g, positions_all, spec.rope, name=f"rotary_all{suffix}"
                )
            cos_sin_all = every_slot[spec.rope.key]
        elif spec.rope is not None:
            if spec.rope.key not in rotations:
                suffix = "" if not rotations else f"_{len(rotations)}"
                rotations[spec.rope.key] = rope_cos_sin(
                    g, position_ids, spec.rope, name=f"rotary{suffix}"
                )
            cos_sin = rotations[spec.rope.key]
        bias = None if mask_key is None else biases[mask_key]
        io = LayerInputs(bias, cos_sin, pasts[i], attention_mask, cos_sin_all)
        hidden, layer_presents = decoder_layer(g, layer, hidden, w, i, io, cfg.hidden_size)
        if paged is not None:  # the new tokens' K/V only: the runtime writes them to its pool
            layer_presents = tuple(
                paged.new_tokens(g, present, f"layers.{i}/new_{name}")
                for present, (name, _) in zip(layer_presents, layer.attention.cache)
            )
        presents.append(layer_presents)

    if last_logits_only:
        last = g.initializer("last_position", np.array([-1], dtype=np.int64))
        end = g.initializer("sequence_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        axis = g.initializer("sequence_axis", np.array([1], dtype=np.int64))
        hidden = g.op("Slice", [hidden, last, end, axis], name="last_position")
    logits = final_logits(g, hidden, w, cfg)
    logits_length = 1 if last_logits_only else SEQUENCE
    g.output(logits, "logits", dtype, [BATCH, logits_length, cfg.vocab_size])
    for i, (layer, layer_presents) in enumerate(zip(cfg.layers, presents)):
        for (name, dims), present in zip(layer.attention.cache, layer_presents):
            shape = [(SEQUENCE if paged is not None else TOTAL) if d == PAST else d for d in dims]
            g.output(present, f"present.{i}.{name}", dtype, shape)
    model = g.model(producer_version=__version__)
    model.metadata_props[CONTEXT_KEY] = str(supported_context(cfg))
    if paged is not None:
        model.metadata_props.update(paged_layout.metadata(kv_block_size))
    return model


def supported_context(cfg: ModelConfig) -> int:
    """Positions the graph supports: the config's context, times the factor of a dynamic
    (NTK) RoPE, whose point is to run past ``max_position_embeddings`` (the rotary tables of
    the other layers must reach as far)."""
    context = cfg.context_length
    for layer in cfg.layers:
        rope = layer.attention.rope
        scaling = dict(rope.scaling or {}) if rope is not None else {}
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "dynamic" and isinstance(scaling.get("factor"), (int, float)):
            context = max(context, int(cfg.context_length * float(scaling["factor"])))
    return context
