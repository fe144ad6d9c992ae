"""How a multi-head latent attention block (:mod:`graphattn.ops.mla`) lowers (portable, ort).

GroupQueryAttention and the ordinary 3-D ``Attention`` rule decline the block ("latent
attention": its cache is the latent and the rope key, not K/V of ``[B, Hkv, T, D]``). The
block's own composition is inlined (RoPE on the rope part becomes ``RotaryEmbedding``, the
latent norms ``RMSNormalization``); its score core becomes:

- ``absorbed`` (the default form): an MQA of ``H`` query heads ``[q_nope W_UK | q_rope]
  [B, H, S, r + p]`` over one key head ``[latent | rope_key] [B, 1, T, r + p]`` and one
  value head ``latent [B, 1, T, r]``, kept as grouped MatMuls (the query heads reshaped onto
  the one key head: ``[B, 1, H·S, r + p] @ [B, 1, r + p, T]``), so the cached latent is read
  once per step for all heads. Measured (``benchmarks/mla_cache.py --speed``): onnxruntime's
  CPU opset-23 ``Attention`` given the same MQA is about 10× slower per decode step at
  DeepSeek-V3's 128 heads (it reads the one KV head once per query head).
  ``ABSORBED_TO_ATTENTION = True`` lowers it to that ``Attention`` instead (for comparison);
- ``expanded``: opset-23 ``Attention``, an MHA over ``k_nope = latent W_UKᵀ``, ``v = latent
  W_UV`` rebuilt from the whole cache at every call.

``k_up``/``v_up`` are 3-D (one matrix per head): int4/int8 keep them float (the quantizers
take 2-D weights); the 2-D projections (``q``/``q_a``/``q_b``, ``kv_a``, ``o``) are quantized
as any MatMul.
"""

from __future__ import annotations

import onnx_ir as ir

from graphattn.compiler.blocks import Block, Context, Rule
from graphattn.ops.domain import DOMAIN

INLINED_PREFIX = "LatentAttention"
ABSORBED_TO_ATTENTION = False
GROUPED = "graphattn.grouped_scores"  # node metadata: keep this score core as MatMuls


def detail(block: Block) -> str:
    """What the block's score core computes, for ``inspect --explain``."""
    a = block.attrs
    expanded = f"MHA of {a.num_heads} heads, K/V rebuilt from the cached latent"
    if a.form == "absorbed":
        core = "Attention" if ABSORBED_TO_ATTENTION and not a.expand_from else "grouped MatMuls"
        text = (
            f"absorbed: MQA of {a.num_heads} query heads over one [latent {a.kv_lora_rank} |"
            f" rope key {a.qk_rope_head_dim}] key head, value = latent, as {core}"
        )
        if a.expand_from:
            text += f"; calls of >= {a.expand_from} tokens: expanded ({expanded}, as MatMuls)"
        return text
    return f"expanded: {expanded}"


def _note(block: Block, ctx: Context) -> None:
    ctx.shared.setdefault("latent_detail", {})[block.layer] = detail(block)


def _why_not(block: Block, ctx: Context) -> str | None:
    _note(block, ctx)
    if block.attrs.expand_from:
        return (
            f"an If picks absorbed (calls under {block.attrs.expand_from} tokens) or expanded;"
            " both branches stay MatMuls"
        )
    if block.attrs.form == "absorbed" and not ABSORBED_TO_ATTENTION:
        ctx.shared.setdefault("latent_grouped", set()).add(block.scope)
        return (
            "absorbed MQA over one latent head: grouped MatMuls read the cache once for all"
            " heads (onnxruntime's CPU Attention ~10x slower per decode step at 128 heads)"
        )
    return None


def _apply(block: Block, ctx: Context) -> None:
    # The call is inlined after all rules ran (lower_attention_blocks); its
    # ScaledDotProductAttention then lowers to Attention with the rest of the graph.
    _note(block, ctx)


def keep_grouped(graph: ir.Graph, ctx: Context) -> int:
    """After inlining: mark the score cores of absorbed blocks (``{scope}/sdpa``) so that
    they stay grouped MatMuls; returns how many."""
    scopes = ctx.shared.get("latent_grouped", set())
    count = 0
    for node in graph:
        if (
            node.domain == DOMAIN
            and node.op_type == "ScaledDotProductAttention"
            and (node.name or "").rsplit("/", 1)[0] in scopes
        ):
            node.metadata_props[GROUPED] = "1"
            count += 1
    if count != len(scopes):
        raise RuntimeError(f"latent lowering: found {count} score cores for {len(scopes)} blocks")
    return count


LATENT_RULE = Rule("Attention", _why_not, _apply, latent=True)
