"""One decoder layer's sparse self-attention as one ``graphattn`` function call.

The semantic block of a layer whose :class:`~graphattn.spec.SparseSpec` says
``native_sparse`` or ``sparse_routed``, from the normed hidden state ``x [B, S, C]``::

    q, k, v = x W_q (+ b_q), x W_k (+ b_k), x W_v (+ b_v)     [B, S, H·D], [B, S, Hkv·D]
    q, k, v = SplitHeads                                       [B, H, S, D], [B, Hkv, S, D]
    NSA:    q, k = RoPE(q), RoPE(k) with cos/sin of the new positions [B, S, R] (if any)
            present = Concat(past, k or v) along T              [B, Hkv, T, D] (rotated keys)
            gates   = gate_coarse/fine/window [H] → [1, H, 1, 1]            (gates "head")
                      or x W_gate (+ b) [B, S, 3H] → 3 × [B, H, S, 1]        (gates "token")
            out     = NativeSparseAttention(q, key, value, mask, gates)
    routed: present = Concat(past, k or v) along T              [B, Hkv, T, D] (keys before RoPE)
            out     = SparseRoutedAttention[Interleaved](q, key, value, mask, cos_all, sin_all)
                      with cos/sin of every slot [B, T, R]: the op rotates the query and each
                      gathered key at its own position
    y       = MergeHeads(out) W_o (+ b_o)                      [B, S, C]

The mask is the graph's ``attention_mask [B, T]`` (int64, 1 = token): the sparse functions
count blocks from each row's first real token and apply causality themselves, so no additive
bias is read. The KV cache is the ordinary ``key``/``value [B, Hkv, T, D]``: nothing else is
cached (block means and centroids are recomputed from the cached keys at every step).

The function is named after the structure (``NativeSparseSelfAttention_head_gates_rope_halves``,
``SparseRoutedSelfAttention_rope_interleaved``, ``..._qkv_bias``); the names do not start with
``SelfAttention``, so the Attention/GroupQueryAttention lowering rules never take them: the
compiler records why (no standard or contrib kernel selects keys by TopK) and inlines the
block, whose small functions are standard ops on ``portable`` and ``ort`` alike.

Inputs by role, in this order (absent roles are not inputs; ``input_roles`` lists them):
``x, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight, o_bias, gate_coarse,
gate_fine, gate_window, gate_weight, gate_bias, cos, sin, attention_mask, past_key,
past_value``. Outputs: ``output [B, S, C]``, ``present_key``, ``present_value [B, Hkv, T, D]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn.ops.attention import _check_heads, _check_positive
from graphattn.ops.attention_block import (
    _block_inputs,
    _call_block,
    _check_rope,
    _check_rope_tables,
    _finish_body,
    _head_counts,
    _missing_projections,
    _present,
    _projection,
    _ref,
    _rotate,
)
from graphattn.ops.domain import DOMAIN
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.heads import MergeHeads, SplitHeads
from graphattn.ops.sparse_attention import (
    NativeSparseAttention,
    SparseRoutedAttention,
    SparseRoutedAttentionInterleaved,
)

KINDS = {"native_sparse": "NativeSparseSelfAttention", "sparse_routed": "SparseRoutedSelfAttention"}
PREFIXES = tuple(KINDS.values())
# Why the Attention / GroupQueryAttention rules cannot take a sparse block (inspect --explain).
DECLINED = {
    "native_sparse": "native sparse attention (TopK block and token selection, gated paths):"
    " no standard or contrib kernel",
    "sparse_routed": "sparse routed attention (TopK segments by cosine routing, RoPE on the"
    " gathered keys): no standard or contrib kernel",
}
HEAD_GATES = ("gate_coarse", "gate_fine", "gate_window")
ROLES = (
    "q_weight",
    "q_bias",
    "k_weight",
    "k_bias",
    "v_weight",
    "v_bias",
    "o_weight",
    "o_bias",
    *HEAD_GATES,
    "gate_weight",
    "gate_bias",
)
ROPE_KINDS = ("none", "halves", "interleaved")
SELECTIONS = ("head", "group")

_FLOAT, _INT, _STRING = ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING
ATTRIBUTES = (
    ("kind", _STRING),  # native_sparse | sparse_routed
    ("num_heads", _INT),
    ("kv_heads", _INT),
    ("head_dim", _INT),
    ("scale", _FLOAT),
    ("block_size", _INT),  # NSA block / routed segment
    ("top_blocks", _INT),  # NSA top-c / routed top-k
    ("top_tokens", _INT),  # NSA top-f (0 for routed)
    ("window", _INT),  # NSA W (0 for routed)
    ("shared", _INT),  # 1: selection "group" (one choice per KV head)
    ("gates", _STRING),  # head | token (NSA); "" for routed
    ("rope", _STRING),  # none | halves | interleaved
    ("rotary_dim", _INT),
    ("input_roles", ir.AttributeType.STRINGS),
)


@dataclass(frozen=True)
class SparseBlockAttributes:
    """What one sparse attention block computes (the call's attributes)."""

    kind: str
    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float
    block_size: int
    top_blocks: int
    top_tokens: int = 0
    window: int = 0
    shared: int = 0
    gates: str = ""
    rope: str = "none"
    rotary_dim: int = 0
    input_roles: tuple[str, ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> SparseBlockAttributes:
        values = {n: node.attributes[n].value for n, _ in ATTRIBUTES if n in node.attributes}
        values["input_roles"] = tuple(values.get("input_roles", ()))
        return cls(**values)

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name, _ in ATTRIBUTES}


def _structure_name(roles: tuple[str, ...], attrs: SparseBlockAttributes) -> str:
    tokens = []
    if attrs.kind == "native_sparse":
        tokens.append(f"{attrs.gates}_gates")
        if "gate_bias" in roles:
            tokens.append("gate_bias")
    biases = "".join(p for p in "qkv" if f"{p}_bias" in roles)
    if biases:
        tokens.append(f"{biases}_bias")
    if "o_bias" in roles:
        tokens.append("o_bias")
    if attrs.rope != "none":
        tokens.append(f"rope_{attrs.rope}")
    return "_".join([KINDS[attrs.kind], *tokens])


def _body(attrs: SparseBlockAttributes, roles: tuple[str, ...]) -> GraphEmitter:
    """The function body for one structure (see the module docstring)."""
    b = GraphEmitter("body")
    inputs = {role: b.input(role, None, None) for role in roles}
    linear = _projection(b, inputs)
    x = inputs["x"]
    heads = _head_counts()
    q, k, v = (
        b.call(SplitHeads, [linear(part, x)], {"heads": heads[part]}, name=f"{part}_heads")
        for part in "qkv"
    )
    mask = inputs["attention_mask"]
    selection = {
        "scale": _ref("scale", _FLOAT),
        "shared": _ref("shared", _INT),
    }
    if attrs.kind == "native_sparse":
        if attrs.rope != "none":
            q, k = _rotate(b, attrs.rope, inputs, q, k)
        key, value = _present(b, inputs, k, v)
        if attrs.gates == "head":
            shape = b.constant("gate_shape", np.array([1, -1, 1, 1], dtype=np.int64))
            gates = [
                b.op("Reshape", [inputs[role], shape], name=f"{role}/heads") for role in HEAD_GATES
            ]
        else:
            logits = linear("gate", x)  # [B, S, 3H]
            split = b.constant("gate_split", np.array([0, 0, 3, -1], dtype=np.int64))
            paths = b.op("Reshape", [logits, split], name="gate/paths")  # [B, S, 3, H]
            paths = b.op("Transpose", [paths], {"perm": [2, 0, 3, 1]}, name="gate/first")
            axis = b.constant("gate_axis", np.array([-1], dtype=np.int64))
            paths = b.op("Unsqueeze", [paths, axis], name="gate/column")  # [3, B, H, S, 1]
            gates = []
            for index, role in enumerate(HEAD_GATES):
                at = b.constant(f"{role}/index", np.array(index, dtype=np.int64))
                gates.append(b.op("Gather", [paths, at], {"axis": 0}, name=role))
        sparse_attrs = {
            **selection,
            "block_size": _ref("block_size", _INT),
            "top_blocks": _ref("top_blocks", _INT),
            "top_tokens": _ref("top_tokens", _INT),
            "window": _ref("window", _INT),
        }
        mixed = b.call(
            NativeSparseAttention, [q, key, value, mask, *gates], sparse_attrs, name="nsa"
        )
    else:
        key, value = _present(b, inputs, k, v)
        function = (
            SparseRoutedAttentionInterleaved
            if attrs.rope == "interleaved"
            else SparseRoutedAttention
        )
        routed_attrs = {
            **selection,
            "segment_size": _ref("block_size", _INT, "segment_size"),
            "top_k": _ref("top_blocks", _INT, "top_k"),
        }
        mixed = b.call(
            function,
            [q, key, value, mask, inputs["cos"], inputs["sin"]],
            routed_attrs,
            name="routed",
        )
    merged = b.call(MergeHeads, [mixed], name="merge_heads")
    return _finish_body(b, merged, linear, key, value)


def _count(parameter: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sparse attention block: {parameter} must be an int >= 1, got {value!r}")
    return value


def sparse_attention_block(
    g: GraphEmitter,
    x_BSC: ir.Value,
    weights: Mapping[str, ir.Value],
    *,
    kind: str,
    attention_mask_BT: ir.Value,
    past_key_BKPD: ir.Value,
    past_value_BKPD: ir.Value,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    top_blocks: int,
    top_tokens: int = 0,
    window: int = 0,
    selection: str = "head",
    gates: str = "head",
    scale: float | None = None,
    rope: str = "none",
    cos_sin: tuple[ir.Value, ir.Value] | None = None,
    rotary_dim: int = 0,
    name: str,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit one sparse block call; returns ``(output [B, S, C], present_key, present_value
    [B, Hkv, T, D])``.

    ``kind``: ``native_sparse`` (``cos_sin [B, S, rotary_dim / 2]`` of the new positions, or
    None without RoPE; gates ``head``: weights ``gate_coarse/fine/window [num_heads]``, or
    ``token``: ``gate_weight [C, 3·num_heads]`` (+ ``gate_bias``), columns coarse | fine |
    window) or ``sparse_routed`` (``cos_sin [B, T, rotary_dim / 2]`` of *every* slot, RoPE
    required; the presents hold keys before RoPE). ``attention_mask [B, T]`` int64.
    ``q/k/v/o_weight [in, out]`` are required, their biases optional. ``selection``: ``head``
    or ``group``. ``scale`` defaults to ``1/sqrt(head_dim)``."""
    if kind not in KINDS:
        raise ValueError(
            f"sparse attention block: kind must be one of {', '.join(KINDS)}, got {kind!r}"
        )
    _check_heads(num_heads, kv_heads, head_dim)
    scale = 1.0 / float(np.sqrt(head_dim)) if scale is None else _check_positive("scale", scale)
    _check_rope(rope)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    _check_rope_tables(rope, cos_sin, rotary_dim, head_dim)
    _count("block_size", block_size)
    _count("top_blocks", top_blocks)
    missing = _missing_projections(weights, ROLES, "sparse attention block")
    if kind == "native_sparse":
        _count("top_tokens", top_tokens)
        _count("window", window)
        if gates not in ("head", "token"):
            raise ValueError(f"gates must be head or token, got {gates!r}")
        needed = HEAD_GATES if gates == "head" else ("gate_weight",)
        missing += [role for role in needed if role not in weights]
        other = ("gate_weight", "gate_bias") if gates == "head" else HEAD_GATES
        stray = [role for role in other if role in weights]
        if stray:
            raise ValueError(f"native sparse attention with {gates} gates: unexpected {stray}")
    else:
        if rope == "none":
            raise ValueError("sparse routed attention needs RoPE (cos_sin of every slot)")
        if top_tokens or window:
            raise ValueError("sparse routed attention has no top_tokens or window")
        stray = [r for r in (*HEAD_GATES, "gate_weight", "gate_bias") if r in weights]
        if stray:
            raise ValueError(f"sparse routed attention has no gates, got {stray}")
        gates = ""
    if missing:
        raise ValueError(f"{kind.replace('_', ' ')} attention block: missing weights {missing}")
    require_rank(x_BSC, 3, "x")
    require_rank(attention_mask_BT, 2, "attention_mask")
    last = {
        "attention_mask": attention_mask_BT,
        "past_key": past_key_BKPD,
        "past_value": past_value_BKPD,
    }
    roles, values = _block_inputs(x_BSC, weights, ROLES, cos_sin, last)
    attrs = SparseBlockAttributes(
        kind=kind,
        num_heads=num_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=scale,
        block_size=block_size,
        top_blocks=top_blocks,
        top_tokens=top_tokens if kind == "native_sparse" else 0,
        window=window if kind == "native_sparse" else 0,
        shared=int(selection == "group"),
        gates=gates,
        rope=rope,
        rotary_dim=rotary_dim if rope != "none" else 0,
        input_roles=roles,
    )
    function_name = _structure_name(roles, attrs)
    body = _body(attrs, roles)
    return _call_block(g, function_name, body, ATTRIBUTES, attrs.as_dict(), values, name)


def sparse_kind(node: ir.Node) -> str | None:
    """``native_sparse`` / ``sparse_routed`` when ``node`` calls a sparse block, else None."""
    if node.domain != DOMAIN:
        return None
    for kind, prefix in KINDS.items():
        if node.op_type == prefix or node.op_type.startswith(f"{prefix}_"):
            return kind
    return None


__all__ = ["DECLINED", "PREFIXES", "SparseBlockAttributes", "sparse_attention_block", "sparse_kind"]
