"""Rewrite each attention block to work on ``[B, S, heads·D]`` directly (portable and ort):

    SplitHeads → RotaryHalves → Concat(past) → ScaledDotProductAttention → MergeHeads
becomes
    RotaryEmbedding(num_heads) → Attention(q, k, v, bias, past_key, past_value)

with 3-D queries/keys/values (``q_num_heads``/``kv_num_heads``), the KV concatenation done by
Attention's own past/present, and no transposes. Blocks that do not have this exact shape are
left alone (the per-op lowering then handles them).
"""

from __future__ import annotations

import onnx_ir as ir

from graphattn.compiler.rewrite import attribute, cast_like, take_over
from graphattn.ops.domain import DOMAIN

_SDPA = ("ScaledDotProductAttention", "ScaledDotProductAttentionSoftcap")
_ROTARY = ("RotaryHalves", "RotaryInterleaved")


def _producer(value: ir.Value | None, op_type: str | tuple[str, ...]) -> ir.Node | None:
    node = None if value is None else value.producer()
    types = (op_type,) if isinstance(op_type, str) else op_type
    return node if node is not None and node.domain == DOMAIN and node.op_type in types else None


def _concat(value: ir.Value) -> ir.Node | None:
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain != "" or len(node.inputs) != 2:
        return None
    return node if attribute(node, "axis") == 2 else None


def _unrotated(value: ir.Value):
    """(split node, rotary node or None) behind a [B, H, S, D] query/key value."""
    rotary = _producer(value, _ROTARY)
    split = _producer(rotary.inputs[0] if rotary else value, "SplitHeads")
    return split, rotary


def _rotate(graph, anchor, rotary, x_BSC, heads, rotary_dim, name, float32):
    if rotary is None:
        return x_BSC
    attrs = {
        "interleaved": int(rotary.op_type == "RotaryInterleaved"),
        "num_heads": heads,
        "rotary_embedding_dim": rotary_dim,
    }
    cos, sin = rotary.inputs[1], rotary.inputs[2]
    if not float32:
        cos = cast_like(graph, anchor, cos, x_BSC, f"{name}/cos")
        sin = cast_like(graph, anchor, sin, x_BSC, f"{name}/sin")
    node = ir.node("RotaryEmbedding", [x_BSC, cos, sin], attrs, name=name)
    node.outputs[0].name = name
    graph.insert_before(anchor, node)
    return node.outputs[0]


def fuse_attention_blocks(graph: ir.Graph, rotary_dim_of, float32: bool = True) -> int:
    """Rewrite every matching block; returns how many. ``rotary_dim_of(rotary_node)``;
    ``float32=False`` casts the float32 cos/sin and bias to the activations' type."""
    count = 0
    for node in list(graph):
        if node.domain != DOMAIN or node.op_type not in _SDPA:
            continue
        query, key_all, value_all, bias = node.inputs[:4]
        key_concat, value_concat = _concat(key_all), _concat(value_all)
        merge = [user for user, _ in node.outputs[0].uses()]
        if key_concat is None or value_concat is None or len(merge) != 1:
            continue
        merge = merge[0]
        q_split, q_rotary = _unrotated(query)
        k_split, k_rotary = _unrotated(key_concat.inputs[1])
        v_split = _producer(value_concat.inputs[1], "SplitHeads")
        if None in (q_split, k_split, v_split) or merge.op_type != "MergeHeads":
            continue
        heads = attribute(q_split, "heads")
        kv_heads = attribute(k_split, "heads")
        scope = node.name
        q = _rotate(
            graph,
            node,
            q_rotary,
            q_split.inputs[0],
            heads,
            rotary_dim_of(q_rotary) if q_rotary else 0,
            f"{scope}/q_rotary",
            float32,
        )
        k = _rotate(
            graph,
            node,
            k_rotary,
            k_split.inputs[0],
            kv_heads,
            rotary_dim_of(k_rotary) if k_rotary else 0,
            f"{scope}/k_rotary",
            float32,
        )
        if not float32:
            bias = cast_like(graph, node, bias, q, f"{scope}/bias")
        attrs = {
            "q_num_heads": heads,
            "kv_num_heads": kv_heads,
            "is_causal": 0,
            "scale": float(attribute(node, "scale")),
        }
        if node.op_type.endswith("Softcap"):
            attrs["softcap"] = float(attribute(node, "softcap"))
        attention = ir.node(
            "Attention",
            [q, k, v_split.inputs[0], bias, key_concat.inputs[0], value_concat.inputs[0]],
            attrs,
            num_outputs=3,
            name=scope,
        )
        graph.insert_before(node, attention)
        take_over(merge.outputs[0], attention.outputs[0])
        take_over(key_concat.outputs[0], attention.outputs[1])
        take_over(value_concat.outputs[0], attention.outputs[2])
        dead = [merge, node, key_concat, value_concat, q_split, k_split, v_split]
        dead += [r for r in (q_rotary, k_rotary) if r is not None]
        for old in dead:
            if all(not v.uses() and not v.is_graph_output() for v in old.outputs):
                graph.remove(old, safe=True)
        count += 1
    return count
