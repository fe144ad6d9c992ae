"""Lower each semantic attention block by reading its one call node.

A block call (``graphattn.SelfAttention*``, see :mod:`graphattn.ops.attention_block`; an
encoder's ``graphattn.EncoderSelfAttention*``, :mod:`graphattn.ops.encoder_block`, reads as
one with ``causal = 0`` and no past/present) carries what it computes as attributes and its
weights, cos/sin, mask and past as inputs by role. Each lowering rule looks at those and
either says why it cannot take the block (a reason, as onnxscript's rewriter does with
``MatchResult.fail``) or emits the block's replacement:

- ``GroupQueryAttention`` (target ``ort``, :mod:`graphattn.compiler.grouped_query`);
- ``Attention`` (opset 23 on ``[B, S, heads·D]``, :mod:`graphattn.compiler.attention3d`);
- otherwise the block stays a call and is inlined: its body's small functions are then
  lowered one by one (``decomposed``). Sparse attention blocks (:mod:`graphattn.ops.
  sparse_block`: native sparse, sparse routed) always are: every rule declines them with
  the reason :data:`graphattn.ops.sparse_block.DECLINED` gives (no kernel selects by TopK).

Every decision is kept, per layer, in the model's metadata (``graphattn.lowering``, JSON) so
``graphattn inspect --explain`` can show which kernel each block became and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphattn.compiler.rewrite import add_initializer, take_over
from graphattn.ops.attention_block import BlockAttributes, is_block
from graphattn.ops.encoder_block import is_encoder_block
from graphattn.ops.mla import LatentAttributes, is_latent_block
from graphattn.ops.sparse_block import DECLINED, sparse_kind
from graphattn.spec import LOWERING_KEY


@dataclass
class Block:
    """One block call: its node, attributes and inputs by role."""

    node: ir.Node
    attrs: BlockAttributes | LatentAttributes
    inputs: dict[str, ir.Value]

    @classmethod
    def of(cls, node: ir.Node) -> Block:
        if is_latent_block(node):
            attrs = LatentAttributes.of(node)
        else:
            attrs = BlockAttributes.of(node)
        return cls(node, attrs, dict(zip(attrs.input_roles, node.inputs)))

    @property
    def latent(self) -> bool:
        """Whether this is a multi-head latent attention block (:mod:`graphattn.ops.mla`)."""
        return isinstance(self.attrs, LatentAttributes)

    @property
    def scope(self) -> str:
        """The call's scope (``layers.3/attn``)."""
        return self.node.name or "attn"

    @property
    def layer(self) -> str:
        return self.scope.split("/")[0]


@dataclass
class Context:
    """What rules may read about the whole graph: its float type, the ort version's features,
    the context length for rotary tables, and values shared between blocks."""

    graph: ir.Graph
    float_dtype: ir.DataType
    context: int = 4096
    query_seqlens: bool = False
    shared: dict[str, object] = field(default_factory=dict)

    @property
    def float32(self) -> bool:
        return self.float_dtype == ir.DataType.FLOAT


class NodeEmitter:
    """Appends nodes before an ``anchor`` node of ``graph``, naming them in ``scope``."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, scope: str) -> None:
        self.graph, self.anchor, self.scope = graph, anchor, scope

    def op(self, op_type: str, inputs, attributes=None, *, label: str, outputs: int = 1, domain=""):
        node = ir.node(
            op_type,
            list(inputs),
            dict(attributes or {}),
            domain=domain,
            num_outputs=outputs,
            name=f"{self.scope}/{label}",
        )
        for index, value in enumerate(node.outputs):
            value.name = node.name if outputs == 1 else f"{node.name}/{index}"
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)


class Emitter(NodeEmitter):
    """A :class:`NodeEmitter` before an attention block's node, in the block's scope."""

    def __init__(self, ctx: Context, block: Block) -> None:
        super().__init__(ctx.graph, block.node, block.scope)
        self.ctx = ctx

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A graph initializer shared by every block (made once)."""
        if name not in self.graph.initializers:
            add_initializer(self.graph, ir.tensor(array, name=name))
        return self.graph.initializers[name]

    def like_activations(self, value: ir.Value, like: ir.Value, label: str) -> ir.Value:
        """``value`` cast to the activations' type where the graph is not float32 (fp16 graphs
        keep float32 cos/sin and masks)."""
        if self.ctx.float32:
            return value
        return self.op("CastLike", [value, like], label=label)


def projections(e: Emitter, block: Block) -> tuple[ir.Value, ir.Value, ir.Value]:
    """q, k, v ``[B, S, heads·D]`` as the block computes them before RoPE: projection (+bias),
    clip, and QK-norm over the full width or per head (reshaped to ``[B, S, heads, D]``)."""
    a, x = block.attrs, block.inputs["x"]

    def linear(part: str) -> ir.Value:
        y = e.op("MatMul", [x, block.inputs[f"{part}_weight"]], label=f"{part}_proj")
        if f"{part}_bias" in block.inputs:
            y = e.op("Add", [y, block.inputs[f"{part}_bias"]], label=f"{part}_proj/bias")
        return y

    q, k, v = (linear(part) for part in "qkv")
    if a.clip_qkv:
        limit = e.constant(f"{e.scope}/clip_limit", np.array(a.clip_qkv, np.float32))
        high = e.like_activations(limit, q, "clip_high")
        low = e.op("Neg", [high], label="clip_low")
        q, k, v = (
            e.op("Clip", [t, low, high], label=f"{p}_clip") for p, t in zip("qkv", (q, k, v))
        )
    if a.qk_norm != "none":
        q = _qk_norm(e, block, "q", q, a.num_heads)
        k = _qk_norm(e, block, "k", k, a.kv_heads)
    return q, k, v


def _qk_norm(e: Emitter, block: Block, part: str, x_BSC: ir.Value, heads: int) -> ir.Value:
    a = block.attrs
    weight = block.inputs[f"{part}_norm_weight"]
    bias = block.inputs.get(f"{part}_norm_bias")
    per_head = a.qk_norm.endswith("head")
    x = x_BSC
    if per_head:
        shape = e.constant(
            f"qk_norm.shape_{heads}_{a.head_dim}", np.array([0, 0, heads, a.head_dim])
        )
        x = e.op("Reshape", [x, shape], label=f"{part}_norm/heads")
    if a.qk_norm.startswith("rms"):
        attrs = {"axis": -1, "epsilon": a.qk_norm_epsilon, "stash_type": 1}
        y = e.op("RMSNormalization", [x, weight], attrs, label=f"{part}_norm")
    else:
        attrs = {"axis": -1, "epsilon": a.qk_norm_epsilon}
        y = e.op("LayerNormalization", [x, weight, bias], attrs, label=f"{part}_norm")
    if per_head:
        flat = e.constant("qk_norm.flat", np.array([0, 0, -1]))
        y = e.op("Reshape", [y, flat], label=f"{part}_norm/merge")
    return y


def output_projection(e: Emitter, block: Block, merged_BSC: ir.Value) -> ir.Value:
    """``merged W_o (+ b_o)``."""
    y = e.op("MatMul", [merged_BSC, block.inputs["o_weight"]], label="o_proj")
    if "o_bias" in block.inputs:
        y = e.op("Add", [y, block.inputs["o_bias"]], label="o_proj/bias")
    return y


def replace_block(ctx: Context, block: Block, output, present_key, present_value) -> None:
    """The new values take over the block's outputs; the call goes."""
    for old, new in zip(block.node.outputs, (output, present_key, present_value)):
        take_over(old, new)
    ctx.graph.remove(block.node, safe=True)


@dataclass(frozen=True)
class Rule:
    """A lowering: ``why_not(block, ctx)`` returns the reason it cannot take the block (or
    None), ``apply(block, ctx)`` emits the replacement. ``latent``: the rule lowers latent
    attention blocks (and only those); the others decline them with "latent attention"."""

    kernel: str
    why_not: Callable[[Block, Context], str | None]
    apply: Callable[[Block, Context], None]
    latent: bool = False


def lower_blocks(ctx: Context, rules: Sequence[Rule]) -> list[dict]:
    """Try ``rules`` in order on every block; returns one decision per block:
    ``{"layer", "kernel", "reasons": {kernel: reason}}`` (kernel ``decomposed`` when no
    rule applied: the block is then inlined and lowered op by op). A latent attention block
    is declined by every ordinary rule ("latent attention") except one whose kernel a latent
    rule provides; ordinary blocks never see the latent rules."""
    decisions = []
    latent_kernels = {rule.kernel for rule in rules if rule.latent}
    for node in list(ctx.graph):
        sparse = sparse_kind(node)
        if sparse is not None:  # no kernel: every rule declines, the block is inlined
            reasons = {rule.kernel: DECLINED[sparse] for rule in rules if not rule.latent}
            layer = (node.name or "attn").split("/")[0]
            decisions.append({"layer": layer, "kernel": "decomposed", "reasons": reasons})
            continue
        if not (is_block(node) or is_latent_block(node) or is_encoder_block(node)):
            continue
        block = Block.of(node)
        reasons: dict[str, str] = {}
        chosen = "decomposed"
        for rule in rules:
            if rule.latent != block.latent:
                if block.latent and rule.kernel not in latent_kernels:
                    reasons[rule.kernel] = "latent attention"
                continue
            reason = rule.why_not(block, ctx)
            if reason is None:
                rule.apply(block, ctx)
                chosen = rule.kernel
                break
            reasons[rule.kernel] = reason
        decision = {"layer": block.layer, "kernel": chosen, "reasons": reasons}
        if is_encoder_block(node):  # what the block computes, for inspect --explain
            decision["detail"] = _encoder_detail(block.attrs)
        decisions.append(decision)
    return decisions


def _encoder_detail(a: BlockAttributes) -> str:
    """``bidirectional, keys |s-t| < 3, rope halves 16``: an encoder block in a few words."""
    parts = ["bidirectional"]
    if a.window:
        parts.append(f"keys |s-t| < {a.window}")
    if a.rope != "none":
        parts.append(f"rope {a.rope} {a.rotary_dim}")
    return ", ".join(parts)


def record(model: ir.Model, decisions: list[dict]) -> None:
    """Keep the decisions in the model metadata (:data:`LOWERING_KEY`)."""
    if decisions:
        model.metadata_props[LOWERING_KEY] = json.dumps(decisions, separators=(",", ":"))


def explain(metadata: dict[str, str]) -> list[str]:
    """Lines for ``inspect --explain``: per layer, the kernel and the reasons of the rules
    that did not fire (consecutive layers with the same decision are grouped)."""
    raw = metadata.get(LOWERING_KEY)
    if raw is None:
        target = metadata.get("graphattn.target", "functions")
        return [f"attention lowering: none recorded (target {target}: blocks kept as functions)"]
    decisions = json.loads(raw)
    lines, groups = ["attention lowering (per layer):"], []
    for decision in decisions:
        kernel = decision["kernel"]
        if decision.get("detail"):
            kernel = f"{kernel} ({decision['detail']})"
        key = (kernel, tuple(sorted(decision["reasons"].items())))
        if groups and groups[-1][1] == key:
            groups[-1][0].append(decision["layer"])
        else:
            groups.append(([decision["layer"]], key))
    for layers, (kernel, reasons) in groups:
        where = (
            layers[0] if len(layers) == 1 else f"{layers[0]} … {layers[-1]} ({len(layers)} layers)"
        )
        lines.append(f"  {where}: {kernel}")
        for other, reason in reasons:
            lines.append(f"    not {other}: {reason}")
    return lines
