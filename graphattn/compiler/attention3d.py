"""Rewrite each attention block to work on ``[B, S, heads·D]`` directly (portable and ort):

    SplitHeads → RotaryHalves → Concat(past) → ScaledDotProductAttention → MergeHeads
becomes
    RotaryEmbedding(num_heads) → Attention(q, k, v, bias, past_key, past_value)

with 3-D queries/keys/values (``q_num_heads``/``kv_num_heads``), the KV concatenation done by
Attention's own past/present, and no transposes. Blocks that do not have this exact shape are
left alone (the per-op lowering then handles them). :func:`match_block` finds the pattern for
this rewrite and for the GroupQueryAttention one (``grouped_query.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class AttentionBlock:
    """One decoder attention block in the functions graph, from head split to head merge.

    ``projections_BSC`` are the 3-D q/k/v projections before SplitHeads; ``pasts`` the past
    key/value ``[B, Hkv, P, D]``; the rotary nodes are None when the block has no RoPE."""

    sdpa: ir.Node
    merge: ir.Node
    key_concat: ir.Node
    value_concat: ir.Node
    splits: tuple[ir.Node, ir.Node, ir.Node]
    q_rotary: ir.Node | None
    k_rotary: ir.Node | None

    @property
    def heads(self) -> int:
        return attribute(self.splits[0], "heads")

    @property
    def kv_heads(self) -> int:
        return attribute(self.splits[1], "heads")

    @property
    def projections_BSC(self) -> tuple[ir.Value, ir.Value, ir.Value]:
        return tuple(split.inputs[0] for split in self.splits)

    @property
    def bias(self) -> ir.Value:
        return self.sdpa.inputs[3]

    @property
    def pasts(self) -> tuple[ir.Value, ir.Value]:
        return self.key_concat.inputs[0], self.value_concat.inputs[0]

    def replace(self, graph: ir.Graph, output_BSC: ir.Value, present_key, present_value) -> None:
        """The new values take over the block's output and presents; the old nodes go."""
        take_over(self.merge.outputs[0], output_BSC)
        take_over(self.key_concat.outputs[0], present_key)
        take_over(self.value_concat.outputs[0], present_value)
        dead = [self.merge, self.sdpa, self.key_concat, self.value_concat, *self.splits]
        dead += [r for r in (self.q_rotary, self.k_rotary) if r is not None]
        for old in dead:
            if all(not v.uses() and not v.is_graph_output() for v in old.outputs):
                graph.remove(old, safe=True)


def match_block(node: ir.Node) -> AttentionBlock | None:
    """The block around an SDPA call (plain or softcap) with past concatenation, or None."""
    if node.domain != DOMAIN or node.op_type not in _SDPA:
        return None
    query, key_all, value_all = node.inputs[:3]
    key_concat, value_concat = _concat(key_all), _concat(value_all)
    merge = [user for user, _ in node.outputs[0].uses()]
    if key_concat is None or value_concat is None or len(merge) != 1:
        return None
    q_split, q_rotary = _unrotated(query)
    k_split, k_rotary = _unrotated(key_concat.inputs[1])
    v_split = _producer(value_concat.inputs[1], "SplitHeads")
    if None in (q_split, k_split, v_split) or merge[0].op_type != "MergeHeads":
        return None
    return AttentionBlock(
        node, merge[0], key_concat, value_concat, (q_split, k_split, v_split), q_rotary, k_rotary
    )


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
        block = match_block(node)
        if block is None:
            continue
        scope = node.name
        query_BSC, key_BSC, value_BSC = block.projections_BSC
        q, k = (
            _rotate(
                graph,
                node,
                rotary,
                x_BSC,
                heads,
                rotary_dim_of(rotary) if rotary else 0,
                f"{scope}/{part}_rotary",
                float32,
            )
            for part, rotary, x_BSC, heads in (
                ("q", block.q_rotary, query_BSC, block.heads),
                ("k", block.k_rotary, key_BSC, block.kv_heads),
            )
        )
        bias = block.bias if float32 else cast_like(graph, node, block.bias, q, f"{scope}/bias")
        attrs = {
            "q_num_heads": block.heads,
            "kv_num_heads": block.kv_heads,
            "is_causal": 0,
            "scale": float(attribute(node, "scale")),
        }
        if node.op_type.endswith("Softcap"):
            attrs["softcap"] = float(attribute(node, "softcap"))
        attention = ir.node(
            "Attention",
            [q, k, value_BSC, bias, *block.pasts],
            attrs,
            num_outputs=3,
            name=scope,
        )
        graph.insert_before(node, attention)
        block.replace(graph, *attention.outputs)
        count += 1
    return count
