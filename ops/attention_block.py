"""One decoder self-attention block as one ``graphattn`` function call.

The block computes, from the normed hidden state ``x [B, S, C]`` and one layer's weights::

    q, k, v = x W_q (+ b_q), x W_k (+ b_k), x W_v (+ b_v)     [B, S, H·D], [B, S, Hkv·D]
    q, k, v = clip(·, ±clip_qkv)                               (OLMo, when set)
    q, k    = norm(q), norm(k) over the full width             (qk_norm_scope "full": OLMo 2)
    q, k, v = SplitHeads                                       [B, H, S, D], [B, Hkv, S, D]
    q, k    = norm(q), norm(k) over head_dim                   (qk_norm_scope "head": Qwen3)
    q, k    = RoPE(q), RoPE(k) with the layer's cos/sin        (when the layer has RoPE)
    present = Concat(past, k or v) along T                     [B, Hkv, T, D]
    out     = softmax(softcap(scale q kᵀ) + bias) v            (ScaledDotProductAttention*)
              or softmax([scale q kᵀ + bias, sink_h])[:T] v    (sinks: GPT-OSS)
    y       = MergeHeads(out) W_o (+ b_o)                      [B, S, C]

The body is composed from the small functions (SplitHeads, RMSNorm, RotaryHalves, ...); it
is generated per *structure* (which biases, norms, RoPE kind and score variant exist), and
named after it (``SelfAttention``, ``SelfAttention_qkv_bias_rope_halves``, ...). What varies
between layers of one structure (heads, scale, softcap, norm epsilon) is an attribute of the
call that the body reads (``ref_attr``); attributes that the body does not need because the
inputs already carry them (``window``: in the bias; ``rotary_dim``: the cos/sin width) are
still on the call, so the compiler lowers a block by reading this one node.

Inputs by role, in this order (absent roles are not inputs; ``input_roles`` lists them):
``x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, q_norm_weight,
q_norm_bias, k_norm_weight, k_norm_bias, sinks, cos, sin, bias, past_key, past_value``
(``sinks [H]``: one learned softmax logit per query head, attribute ``sinks = 1``). Outputs:
``output [B, S, C]``, ``present_key``, ``present_value [B, Hkv, T, D]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn.ops.attention import (
    _VARIANTS,
    ScaledDotProductAttentionHeadBias,
    ScaledDotProductAttentionSinks,
    _check_heads,
    _check_positive,
    _check_sinks,
)
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.heads import MergeHeads, SplitHeads
from graphattn.ops.norms import LayerNorm, RMSNorm, _check_epsilon
from graphattn.ops.rotary import RotaryHalves, RotaryInterleaved

ROLES = (
    "q_weight",
    "q_bias",
    "k_weight",
    "k_bias",
    "v_weight",
    "v_bias",
    "o_weight",
    "o_bias",
    "q_norm_weight",
    "q_norm_bias",
    "k_norm_weight",
    "k_norm_bias",
    "sinks",
)
ROPE_KINDS = ("none", "halves", "interleaved")
QK_NORMS = ("none", "rms_head", "rms_full", "layer_head", "layer_full")

_FLOAT, _INT, _STRING = ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING
# Attributes of every block call: (name, type). The body reads some through ref_attr.
ATTRIBUTES = (
    ("num_heads", _INT),
    ("kv_heads", _INT),
    ("head_dim", _INT),
    ("scale", _FLOAT),
    ("softcap", _FLOAT),  # 0: none
    ("window", _INT),  # 0: none
    ("causal", _INT),
    ("rope", _STRING),  # none | halves | interleaved
    ("rotary_dim", _INT),  # 0: no RoPE
    ("qk_norm", _STRING),  # none | rms_head | rms_full | layer_head | layer_full
    ("qk_norm_epsilon", _FLOAT),
    ("clip_qkv", _FLOAT),  # 0: none
    ("alibi", _INT),  # 1: the bias input is per head [B, H, S, T] (ALiBi added to the mask)
    ("sinks", _INT),  # 1: input sinks [H], one extra softmax logit per query head (GPT-OSS)
    ("input_roles", ir.AttributeType.STRINGS),
)


@dataclass(frozen=True)
class BlockAttributes:
    """What one attention block computes (the call's attributes, see module docstring)."""

    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float = 0.0
    window: int = 0
    causal: int = 1
    rope: str = "none"
    rotary_dim: int = 0
    qk_norm: str = "none"
    qk_norm_epsilon: float = 0.0
    clip_qkv: float = 0.0
    alibi: int = 0
    sinks: int = 0
    input_roles: tuple[str, ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> BlockAttributes:
        """The attributes of a block call node (one written before an attribute existed
        reads that attribute's default)."""
        values = {
            name: node.attributes[name].value for name, _ in ATTRIBUTES if name in node.attributes
        }
        values["input_roles"] = tuple(values["input_roles"])
        return cls(**values)

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name, _ in ATTRIBUTES}


def _ref(name: str, kind: ir.AttributeType, as_name: str | None = None) -> ir.Attr:
    return ir.RefAttr(as_name or name, name, kind)


# ------------------------------------------------ shared with the sparse block (sparse_block)
def _check_rope(rope: str) -> None:
    if rope not in ROPE_KINDS:
        raise ValueError(f"rope must be one of {', '.join(ROPE_KINDS)}, got {rope!r}")


def _check_rope_tables(rope: str, cos_sin: object, rotary_dim: int, head_dim: int) -> None:
    if (rope == "none") != (cos_sin is None):
        raise ValueError("cos_sin must be given exactly when rope is halves or interleaved")
    if rope != "none" and (rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim):
        raise ValueError(f"rotary_dim must be even in [2, head_dim={head_dim}], got {rotary_dim}")


def _missing_projections(weights: Mapping[str, ir.Value], roles: tuple[str, ...], what: str):
    """The missing ``q/k/v/o_weight`` roles, after refusing roles outside ``roles``."""
    unknown = set(weights) - set(roles)
    if unknown:
        raise ValueError(f"{what}: unknown weight roles {sorted(unknown)}")
    return [f"{p}_weight" for p in "qkvo" if f"{p}_weight" not in weights]


def _block_inputs(
    x_BSC: ir.Value,
    weights: Mapping[str, ir.Value],
    roles_in_order: tuple[str, ...],
    cos_sin: tuple[ir.Value, ir.Value] | None,
    last: Mapping[str, ir.Value],
) -> tuple[tuple[str, ...], list[ir.Value]]:
    """The call's ``(input_roles, inputs)``: x, the weights present, cos/sin, then ``last``."""
    roles = ("x", *(r for r in roles_in_order if r in weights))
    values = [x_BSC, *(weights[r] for r in roles[1:])]
    if cos_sin is not None:
        roles += ("cos", "sin")
        values += list(cos_sin)
    roles += tuple(last)
    values += list(last.values())
    return roles, values


def _projection(b: GraphEmitter, inputs: Mapping[str, ir.Value]):
    """``linear(part, x)``: ``x W_part (+ b_part)`` in the body ``b``."""

    def linear(part: str, x: ir.Value) -> ir.Value:
        y = b.op("MatMul", [x, inputs[f"{part}_weight"]], name=f"{part}_proj")
        if f"{part}_bias" in inputs:
            y = b.op("Add", [y, inputs[f"{part}_bias"]], name=f"{part}_proj/bias")
        return y

    return linear


def _head_counts() -> dict[str, ir.Attr]:
    """SplitHeads' ``heads`` per projection, read from the call's num_heads / kv_heads."""
    heads = {"q": _ref("num_heads", _INT, "heads"), "k": _ref("kv_heads", _INT, "heads")}
    heads["v"] = heads["k"]
    return heads


def _rotate(b: GraphEmitter, rope: str, inputs, q: ir.Value, k: ir.Value):
    """``q, k`` rotated by the body's cos/sin inputs (``rope`` halves or interleaved)."""
    rotary = RotaryInterleaved if rope == "interleaved" else RotaryHalves
    cos, sin = inputs["cos"], inputs["sin"]
    q = b.call(rotary, [q, cos, sin], name="q_rotary")
    k = b.call(rotary, [k, cos, sin], name="k_rotary")
    return q, k


def _present(b: GraphEmitter, inputs, k: ir.Value, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """The presents ``Concat(past, k or v)`` along T."""
    key = b.op("Concat", [inputs["past_key"], k], {"axis": 2}, name="present_key")
    value = b.op("Concat", [inputs["past_value"], v], {"axis": 2}, name="present_value")
    return key, value


def _finish_body(b: GraphEmitter, merged: ir.Value, linear, key: ir.Value, value: ir.Value):
    """``y = merged W_o (+ b_o)``; the body's outputs (output, present_key, present_value)."""
    output = linear("o", merged)
    for value_out, label in ((output, "output"), (key, "present_key"), (value, "present_value")):
        b.output(value_out, label, ir.DataType.UNDEFINED)
        b.graph.outputs[-1].type = None
    return b


def _call_block(
    g: GraphEmitter,
    function_name: str,
    body: GraphEmitter,
    attributes: tuple[tuple[str, ir.AttributeType], ...],
    attribute_values: Mapping[str, object],
    values: list[ir.Value],
    name: str,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Define the block function ``function_name`` (declaring ``attributes``) and call it."""
    declared = [ir.Attr(n, kind, None) for n, kind in attributes]
    g.define(body.function_body(function_name, declared), body.functions)
    call_attrs = {
        n: ir.Attr(n, kind, list(v) if isinstance(v, tuple) else v)
        for (n, kind), v in zip(attributes, attribute_values.values())
    }
    return g.call_defined(
        function_name,
        values,
        call_attrs,
        name=name,
        outputs=("output", "present_key", "present_value"),
    )


def _structure_name(roles: tuple[str, ...], attrs: BlockAttributes) -> str:
    """``SelfAttention`` plus a token per structural feature, in a fixed order."""
    tokens = []
    biases = "".join(p for p in "qkv" if f"{p}_bias" in roles)
    if biases:
        tokens.append(f"{biases}_bias")
    if "o_bias" in roles:
        tokens.append("o_bias")
    if attrs.clip_qkv:
        tokens.append("clip")
    if attrs.qk_norm != "none":
        affine = "".join(
            s for s, role in (("w", "q_norm_weight"), ("b", "q_norm_bias")) if role in roles
        )
        tokens.append(f"qk_{attrs.qk_norm}" + (f"_{affine}" if affine != "w" else ""))
    if attrs.rope != "none":
        tokens.append(f"rope_{attrs.rope}")
    if attrs.softcap:
        tokens.append("softcap")
    if attrs.alibi:
        tokens.append("alibi")
    if attrs.sinks:
        tokens.append("sinks")
    return "_".join(["SelfAttention", *tokens])


def _body(attrs: BlockAttributes, roles: tuple[str, ...]) -> GraphEmitter:
    """The function body for one structure (see module docstring)."""
    b = GraphEmitter("body")
    inputs = {role: b.input(role, None, None) for role in roles}
    linear = _projection(b, inputs)

    def norm(part: str, x: ir.Value) -> ir.Value:
        weight, bias = inputs.get(f"{part}_norm_weight"), inputs.get(f"{part}_norm_bias")
        epsilon = {"epsilon": _ref("qk_norm_epsilon", _FLOAT, "epsilon")}
        if attrs.qk_norm.startswith("rms"):
            if weight is None:
                raise ValueError(f"{part}_norm: an RMS qk-norm needs a weight")
            return b.call(RMSNorm, [x, weight], epsilon, name=f"{part}_norm")
        if weight is None or bias is None:
            raise ValueError(f"{part}_norm: a LayerNorm qk-norm needs a weight and a bias")
        return b.call(LayerNorm, [x, weight, bias], epsilon, name=f"{part}_norm")

    x = inputs["x"]
    q, k, v = (linear(part, x) for part in "qkv")
    if attrs.clip_qkv:
        limit = b.op(
            "Constant",
            [],
            {"value_float": _ref("clip_qkv", _FLOAT, "value_float")},
            name="clip_limit",
        )
        high = b.op("CastLike", [limit, q], name="clip_high")
        low = b.op("Neg", [high], name="clip_low")
        q, k, v = (
            b.op("Clip", [t, low, high], name=f"{part}_clip") for part, t in zip("qkv", (q, k, v))
        )
    if attrs.qk_norm.endswith("full"):
        q, k = norm("q", q), norm("k", k)
    heads = _head_counts()
    q, k, v = (
        b.call(SplitHeads, [t], {"heads": heads[part]}, name=f"{part}_heads")
        for part, t in zip("qkv", (q, k, v))
    )
    if attrs.qk_norm.endswith("head"):
        q, k = norm("q", q), norm("k", k)
    if attrs.rope != "none":
        q, k = _rotate(b, attrs.rope, inputs, q, k)
    key, value = _present(b, inputs, k, v)
    variant = _VARIANTS[(bool(attrs.softcap), False)]
    scores_in = [q, key, value, inputs["bias"]]
    if attrs.alibi:
        if attrs.softcap:
            raise ValueError("an ALiBi block with a softcap is not supported")
        variant = ScaledDotProductAttentionHeadBias
    if attrs.sinks:
        variant = ScaledDotProductAttentionSinks
        scores_in.append(inputs["sinks"])
    score_attrs = {"scale": _ref("scale", _FLOAT)}
    if attrs.softcap:
        score_attrs["softcap"] = _ref("softcap", _FLOAT)
    mixed = b.call(variant, scores_in, score_attrs, name="sdpa")
    merged = b.call(MergeHeads, [mixed], name="merge_heads")
    return _finish_body(b, merged, linear, key, value)


def self_attention_block(
    g: GraphEmitter,
    x_BSC: ir.Value,
    weights: Mapping[str, ir.Value],
    *,
    bias_B1ST: ir.Value,
    past_key_BKPD: ir.Value,
    past_value_BKPD: ir.Value,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    rope: str = "none",
    cos_sin: tuple[ir.Value, ir.Value] | None = None,
    rotary_dim: int = 0,
    qk_norm: str = "none",
    qk_norm_epsilon: float = 1e-6,
    clip_qkv: float | None = None,
    alibi: bool = False,
    name: str,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit one block call; returns ``(output [B, S, C], present_key, present_value)``.

    ``weights`` maps the roles of :data:`ROLES` that exist to values (``q/k/v/o_weight``
    ``[in, out]`` are required). ``bias_B1ST`` is the additive mask (causality, window and
    padding already in it; ``window`` is recorded for the compiler). ``rope`` is ``none``,
    ``halves`` or ``interleaved`` with ``cos_sin [B, S, rotary_dim / 2]``. ``alibi``: the
    bias is per query head ``[B, H, S, T]`` (ALiBi added to the mask). A ``sinks`` weight
    ``[num_heads]`` adds one learned logit per query head to every row's softmax (GPT-OSS's
    attention sinks; not with a softcap or ALiBi)."""
    _check_heads(num_heads, kv_heads, head_dim)
    scale = 1.0 / float(np.sqrt(head_dim)) if scale is None else _check_positive("scale", scale)
    softcap = _check_positive("softcap", softcap) or 0.0
    clip_qkv = _check_positive("clip_qkv", clip_qkv) or 0.0
    _check_rope(rope)
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm must be one of {', '.join(QK_NORMS)}, got {qk_norm!r}")
    _check_rope_tables(rope, cos_sin, rotary_dim, head_dim)
    missing = _missing_projections(weights, ROLES, "attention block")
    if missing:
        raise ValueError(f"attention block: missing weights {missing}")
    require_rank(x_BSC, 3, "x")
    if "sinks" in weights:
        _check_sinks(weights["sinks"], num_heads, softcap=bool(softcap), ssmax=False)
        if alibi:
            raise ValueError("attention sinks with ALiBi are not supported")
    last = {"bias": bias_B1ST, "past_key": past_key_BKPD, "past_value": past_value_BKPD}
    roles, values = _block_inputs(x_BSC, weights, ROLES, cos_sin, last)
    attrs = BlockAttributes(
        num_heads=num_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=scale,
        softcap=softcap,
        window=int(window or 0),
        rope=rope,
        rotary_dim=rotary_dim if rope != "none" else 0,
        qk_norm=qk_norm,
        qk_norm_epsilon=_check_epsilon(qk_norm_epsilon) if qk_norm != "none" else 0.0,
        clip_qkv=clip_qkv,
        alibi=int(bool(alibi)),
        sinks=int("sinks" in weights),
        input_roles=roles,
    )
    function_name = _structure_name(roles, attrs)
    body = _body(attrs, roles)
    return _call_block(g, function_name, body, ATTRIBUTES, attrs.as_dict(), values, name)


def is_block(node: ir.Node) -> bool:
    """Whether ``node`` calls a self-attention block function."""
    from graphattn.ops.domain import DOMAIN

    return node.domain == DOMAIN and node.op_type.startswith("SelfAttention")
