"""One encoder (bidirectional) self-attention block as one ``graphattn`` function call.

The block computes, from the (normed) hidden state ``x [B, S, C]`` and one layer's weights::

    q, k, v = x W_q (+ b_q), x W_k (+ b_k), x W_v (+ b_v)     [B, S, H·D]
    q, k, v = SplitHeads                                       [B, H, S, D]
    q, k    = RoPE(q), RoPE(k) with the layer's cos/sin        (when the layer has RoPE)
    out     = softmax(scale q kᵀ + bias) v                     (ScaledDotProductAttention)
    y       = MergeHeads(out) W_o (+ b_o)                      [B, S, C]

with no causality and no KV cache: ``bias [B, 1, S, S]`` (from
:func:`graphattn.ops.encoder.bidirectional_bias`) drops the row's pad keys and, for a local
layer (ModernBERT), the keys with ``|s - t| >= window``. Keys and values are as many heads as
the queries (``kv_heads = num_heads``).

The body is generated per *structure* (which biases exist, the RoPE kind) and named after
it: ``EncoderSelfAttention``, ``EncoderSelfAttention_qkv_bias_o_bias`` (BERT),
``EncoderSelfAttention_rope_halves`` (ModernBERT). Its attributes are those of the decoder's
block (:data:`graphattn.ops.attention_block.ATTRIBUTES`) that an encoder block has, so the
compiler reads it as a :class:`~graphattn.ops.attention_block.BlockAttributes` with
``causal = 0``: ``num_heads``, ``kv_heads``, ``head_dim``, ``scale`` (the body reads these),
``window`` (0: every key; W: keys with ``|s - t| < W``, already in the bias), ``causal`` (0),
``rope`` (``none`` | ``halves`` | ``interleaved``), ``rotary_dim`` (0 without RoPE; the cos/sin
width is half of it) and ``input_roles``.

Inputs by role, in this order (absent roles are not inputs): ``x, q_weight, q_bias, k_weight,
k_bias, v_weight, v_bias, o_weight, o_bias, cos, sin, bias``. One output: ``output [B, S, C]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphattn.ops.attention import ScaledDotProductAttention, _check_heads, _check_positive
from graphattn.ops.attention_block import ATTRIBUTES, ROPE_KINDS, BlockAttributes
from graphattn.ops.domain import DOMAIN
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.heads import MergeHeads, SplitHeads
from graphattn.ops.rotary import RotaryHalves, RotaryInterleaved

PREFIX = "EncoderSelfAttention"
ROLES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "o_weight", "o_bias")
# the decoder block's attributes an encoder block has (the others keep their defaults)
NAMES = ("num_heads", "kv_heads", "head_dim", "scale", "window", "causal", "rope", "rotary_dim")
ENCODER_ATTRIBUTES = tuple((n, kind) for n, kind in ATTRIBUTES if n in (*NAMES, "input_roles"))
_FLOAT, _INT = ir.AttributeType.FLOAT, ir.AttributeType.INT


def _structure_name(roles: tuple[str, ...], rope: str) -> str:
    tokens = []
    biases = "".join(p for p in "qkv" if f"{p}_bias" in roles)
    if biases:
        tokens.append(f"{biases}_bias")
    if "o_bias" in roles:
        tokens.append("o_bias")
    if rope != "none":
        tokens.append(f"rope_{rope}")
    return "_".join([PREFIX, *tokens])


def _body(roles: tuple[str, ...], rope: str) -> GraphEmitter:
    b = GraphEmitter("body")
    inputs = {role: b.input(role, None, None) for role in roles}

    def linear(part: str, x: ir.Value) -> ir.Value:
        y = b.op("MatMul", [x, inputs[f"{part}_weight"]], name=f"{part}_proj")
        if f"{part}_bias" in inputs:
            y = b.op("Add", [y, inputs[f"{part}_bias"]], name=f"{part}_proj/bias")
        return y

    heads = {"heads": ir.RefAttr("heads", "num_heads", _INT)}
    q, k, v = (
        b.call(SplitHeads, [linear(part, inputs["x"])], heads, name=f"{part}_heads")
        for part in "qkv"
    )
    if rope != "none":
        rotary = RotaryInterleaved if rope == "interleaved" else RotaryHalves
        cos, sin = inputs["cos"], inputs["sin"]
        q = b.call(rotary, [q, cos, sin], name="q_rotary")
        k = b.call(rotary, [k, cos, sin], name="k_rotary")
    scale = {"scale": ir.RefAttr("scale", "scale", _FLOAT)}
    mixed = b.call(ScaledDotProductAttention, [q, k, v, inputs["bias"]], scale, name="sdpa")
    output = linear("o", b.call(MergeHeads, [mixed], name="merge_heads"))
    b.output(output, "output", ir.DataType.UNDEFINED)
    b.graph.outputs[-1].type = None
    return b


def encoder_attention_block(
    g: GraphEmitter,
    x_BSC: ir.Value,
    weights: Mapping[str, ir.Value],
    *,
    bias_B1SS: ir.Value,
    num_heads: int,
    head_dim: int,
    scale: float | None = None,
    window: int | None = None,
    rope: str = "none",
    cos_sin: tuple[ir.Value, ir.Value] | None = None,
    rotary_dim: int = 0,
    name: str,
) -> ir.Value:
    """Emit one encoder block call; returns ``output [B, S, C]``.

    ``weights`` maps the roles of :data:`ROLES` that exist to values (``q/k/v/o_weight``
    ``[in, out]`` are required). ``bias_B1SS`` is the additive mask in the activations' type
    (padding and the window already in it; ``window`` is recorded for the compiler). ``rope``
    is ``none``, ``halves`` or ``interleaved`` with ``cos_sin [B, S, rotary_dim / 2]``."""
    _check_heads(num_heads, num_heads, head_dim)
    scale = 1.0 / float(np.sqrt(head_dim)) if scale is None else _check_positive("scale", scale)
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if rope not in ROPE_KINDS:
        raise ValueError(f"rope must be one of {', '.join(ROPE_KINDS)}, got {rope!r}")
    if (rope == "none") != (cos_sin is None):
        raise ValueError("cos_sin must be given exactly when rope is halves or interleaved")
    if rope != "none" and (rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim):
        raise ValueError(f"rotary_dim must be even in [2, head_dim={head_dim}], got {rotary_dim}")
    unknown = set(weights) - set(ROLES)
    if unknown:
        raise ValueError(f"encoder attention block: unknown weight roles {sorted(unknown)}")
    missing = [f"{p}_weight" for p in "qkvo" if f"{p}_weight" not in weights]
    if missing:
        raise ValueError(f"encoder attention block: missing weights {missing}")
    require_rank(x_BSC, 3, "x")
    require_rank(bias_B1SS, 4, "bias")
    roles = ("x", *(r for r in ROLES if r in weights))
    values = [x_BSC, *(weights[r] for r in roles[1:])]
    if cos_sin is not None:
        roles += ("cos", "sin")
        values += list(cos_sin)
    roles += ("bias",)
    values.append(bias_B1SS)
    attrs = BlockAttributes(
        num_heads=num_heads,
        kv_heads=num_heads,
        head_dim=head_dim,
        scale=scale,
        window=int(window or 0),
        causal=0,
        rope=rope,
        rotary_dim=rotary_dim if rope != "none" else 0,
        input_roles=roles,
    )
    function_name = _structure_name(roles, rope)
    body = _body(roles, rope)
    declared = [ir.Attr(n, kind, None) for n, kind in ENCODER_ATTRIBUTES]
    g.define(body.function_body(function_name, declared), body.functions)
    values_by_name = attrs.as_dict()
    call_attrs = {
        n: ir.Attr(n, kind, list(v) if isinstance(v, tuple) else v)
        for n, kind in ENCODER_ATTRIBUTES
        for v in (values_by_name[n],)
    }
    return g.call_defined(function_name, values, call_attrs, name=name)


def is_encoder_block(node: ir.Node) -> bool:
    """Whether ``node`` calls an encoder self-attention block function."""
    return node.domain == DOMAIN and node.op_type.startswith(PREFIX)
