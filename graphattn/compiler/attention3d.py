"""Lower an attention block to opset-23 ``Attention`` on ``[B, S, heads·D]`` (portable, ort).

    projections (+ clip, QK-norm) → RotaryEmbedding(num_heads) → Attention(q, k, v, bias,
    past_key, past_value) → o_proj

with 3-D queries/keys/values (``q_num_heads``/``kv_num_heads``), the KV concatenation done by
Attention's own past/present, and no transposes. The block's mask input (causality, window and
padding) is Attention's ``attn_mask``; its cos/sin ``[B, S, R]`` feed RotaryEmbedding directly,
so every RoPE scaling works here, per-call ones (longrope, dynamic) included. An encoder block
(no cache) becomes ``Attention(q, k, v, bias)`` with its one output.
"""

from __future__ import annotations

from graphattn.compiler.blocks import (
    Block,
    Context,
    Emitter,
    Rule,
    output_projection,
    projections,
    replace_block,
)


def _why_not(block: Block, ctx: Context) -> str | None:
    # Attention-23 computes every other block our builder emits; a block kind it cannot
    # express says why here (the block is then decomposed).
    if block.attrs.sinks:
        return "attention sinks: opset-23 Attention has no per-head softmax sink logit"
    return None


def rotate(e: Emitter, block: Block, x_BSC, heads: int, part: str):
    """RotaryEmbedding of ``x [B, S, heads·D]`` with the block's cos/sin (or x without RoPE)."""
    a = block.attrs
    if a.rope == "none":
        return x_BSC
    cos = e.like_activations(block.inputs["cos"], x_BSC, f"{part}_rotary/cos")
    sin = e.like_activations(block.inputs["sin"], x_BSC, f"{part}_rotary/sin")
    attrs = {
        "interleaved": int(a.rope == "interleaved"),
        "num_heads": heads,
        "rotary_embedding_dim": a.rotary_dim,
    }
    return e.op("RotaryEmbedding", [x_BSC, cos, sin], attrs, label=f"{part}_rotary")


def _apply(block: Block, ctx: Context) -> None:
    e, a = Emitter(ctx, block), block.attrs
    q, k, v = projections(e, block)
    q = rotate(e, block, q, a.num_heads, "q")
    k = rotate(e, block, k, a.kv_heads, "k")
    bias = e.like_activations(block.inputs["bias"], q, "bias")
    attrs = {
        "q_num_heads": a.num_heads,
        "kv_num_heads": a.kv_heads,
        "is_causal": 0,
        "scale": a.scale,
    }
    if a.softcap:
        attrs["softcap"] = a.softcap
    if "past_key" not in block.inputs:  # an encoder block: no cache, one output
        output = e.op("Attention", [q, k, v, bias], attrs, label="attention")
        replace_block(ctx, block, output_projection(e, block, output), None, None)
        return
    output, key, value = e.op(
        "Attention",
        [q, k, v, bias, block.inputs["past_key"], block.inputs["past_value"]],
        attrs,
        label="attention",
        outputs=3,
    )
    replace_block(ctx, block, output_projection(e, block, output), key, value)


ATTENTION_RULE = Rule("Attention", _why_not, _apply)
