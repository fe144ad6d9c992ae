"""How a multi-head latent attention block (:mod:`graphattn.ops.mla`) lowers (portable, ort).

GroupQueryAttention and the ordinary 3-D ``Attention`` rule decline the block ("latent
attention": its cache is the latent and the rope key, not K/V of ``[B, Hkv, T, D]``). The
latent rule keeps the block's own composition and inlines it; its score core then becomes
one opset-23 ``Attention`` (4-D, explicit ``scale``, the bias as ``attn_mask``):

- ``absorbed``: an MQA with ``q_num_heads = H`` over one key head: query ``[q_nope W_UK |
  q_rope] [B, H, S, r + p]``, key ``[latent | rope_key] [B, 1, T, r + p]``, value ``latent
  [B, 1, T, r]`` (a value head narrower than the key head), then ``@ W_UV``;
- ``expanded``: an MHA over ``k_nope = latent W_UKᵀ``, ``v = latent W_UV`` rebuilt from the
  whole cache.

RoPE becomes ``RotaryEmbedding`` on the rope part (queries ``[B, H, S, p]``, the rope key as
one head ``[B, 1, S, p]``), the latent norms ``RMSNormalization``. ``k_up``/``v_up`` are 3-D
(one matrix per head): int4/int8 keep them float (the quantizers take 2-D weights only); the
2-D projections (``q``/``q_a``/``q_b``, ``kv_a``, ``o``) are quantized as any MatMul.
"""

from __future__ import annotations

from graphattn.compiler.blocks import Block, Context, Rule

INLINED_PREFIX = "LatentAttention"


def detail(block: Block) -> str:
    """What the block's Attention computes, for ``inspect --explain``."""
    a = block.attrs
    if a.form == "absorbed":
        return (
            f"absorbed: MQA of {a.num_heads} query heads over one [latent {a.kv_lora_rank} |"
            f" rope key {a.qk_rope_head_dim}] key head, value = latent"
        )
    return f"expanded: MHA of {a.num_heads} heads, K/V rebuilt from the cached latent"


def _why_not(block: Block, ctx: Context) -> str | None:
    return None


def _apply(block: Block, ctx: Context) -> None:
    # The call is inlined after all rules ran (lower_attention_blocks); its
    # ScaledDotProductAttention then lowers to Attention with the rest of the graph.
    ctx.shared.setdefault("latent_detail", {})[block.layer] = detail(block)


LATENT_RULE = Rule("Attention", _why_not, _apply, latent=True)
