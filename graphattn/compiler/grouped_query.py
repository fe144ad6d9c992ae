"""Lower decoder attention blocks to ``com.microsoft.GroupQueryAttention`` (target ``ort``).

    graphattn.SelfAttention*(x, weights, cos, sin, bias, past_key, past_value)
becomes
    projections (+ clip, QK-norm) →
    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache, attention_bias=padding_bias[, query_seqlens])
    → o_proj

with RoPE done inside the kernel (``do_rotary``) from ``[context, R]`` cos/sin tables computed
here in NumPy, and, after MatMul packing, the packed q/k/v projection fed to it directly
(:func:`feed_packed_qkv`), so the block has no Split, no RotaryEmbedding and no Concat.

Positions. The kernel rotates the token in cache slot ``t`` by angle ``t·inv_freq``. For a
left-padded row that is the model's position plus the row's pad count: every query and key of
the row is shifted by the same amount, and RoPE scores depend only on position differences,
so the attention is the same (to float rounding) as with ``position_ids``. Causality and a
sliding window (``local_window_size``) are the kernel's own; ``attention_bias`` only drops pad
keys. Attention sinks (GPT-OSS) are the kernel's ``head_sink [num_heads]`` input: one logit per
head in every row's softmax denominator, as the block computes (onnxruntime 1.30 and newer,
so every version graphattn lowers for, :data:`~graphattn.compiler.ort_version.HEAD_SINK_SINCE`).
A block the kernel cannot express (not causal, a mask other than the decoder's causal
``AttentionBias``, head_dim not a multiple of 16, RoPE whose frequencies change per call)
keeps opset-23 Attention, and the rule says why (``inspect --explain``); so does a block
whose past is a paged pool (:mod:`graphattn.paged`).

Lengths, computed once per graph from the input shapes (left padding: every row's cache has
the same length): ``seqlens_k[b] = T − 1``, ``total_sequence_length = T``,
``query_seqlens[b] = S``. ``query_seqlens`` (onnxruntime 1.32+, so only when lowering for
such a version) lets a batch of several rows continue with several tokens after a past in
one call; without it the CPU kernel refuses that case and the runtime feeds such a
continuation one token per call (model metadata ``graphattn.batched_continuation``).

The KV cache can share one ``[B, Hkv, capacity, D]`` buffer between past and present
(``past_present_share_buffer``): the kernel then writes the new keys in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn.compiler.blocks import (
    Block,
    Context,
    Emitter,
    Rule,
    output_projection,
    projections,
    replace_block,
)
from graphattn.compiler.rewrite import MS_DOMAIN, add_initializer, attribute
from graphattn.ops.domain import DOMAIN, MASKED_BIAS

DEFAULT_CONTEXT = 4096
HEAD_SINK_INPUT = 11  # GroupQueryAttention's input index of head_sink (attention sinks)
QUERY_SEQLENS_INPUT = 16  # GroupQueryAttention's input index of query_seqlens (1.32+)


_STATIC_ROTARY = ("RotaryCosSin", "RotaryCosSinScaled")


def _static_frequencies(block: Block) -> tuple[ir.Value, float] | str:
    """``(inv_freq [R] constant, attention factor)`` behind the block's cos/sin, or the reason
    the kernel's fixed cos/sin cache cannot hold them."""
    cos = block.inputs.get("cos")
    producer = cos.producer() if cos is not None else None
    if producer is None or producer.domain != DOMAIN:
        return "cos/sin are not computed from constant frequencies"
    if producer.op_type in ("RotaryCosSinSwitched", "RotaryCosSinDynamic"):
        kind = "longrope" if producer.op_type.endswith("Switched") else "dynamic"
        return f"{kind} RoPE changes its frequencies per call; the kernel's cos/sin cache is fixed"
    if producer.op_type not in _STATIC_ROTARY:
        return f"cos/sin come from {producer.op_type}, not from constant frequencies"
    inv_freq = producer.inputs[1]
    if inv_freq.const_value is None:
        return "the RoPE frequencies are not constant"
    factor = 1.0
    if producer.op_type == "RotaryCosSinScaled":
        scalar = producer.inputs[2]
        if scalar.const_value is None:
            return "the RoPE attention factor is not constant"
        factor = float(scalar.const_value.numpy())
    return inv_freq, factor


def _rotary_tables(ctx: Context, inv_freq: ir.Value, factor: float):
    """(cos_cache, sin_cache) ``[context, R]`` initializers shared by every layer with the
    same frequencies."""
    np_dtype = np.float32 if ctx.float32 else np.float16
    names = [f"{inv_freq.name}.{kind}_cache" for kind in ("cos", "sin")]
    graph = ctx.graph
    if names[0] not in graph.initializers:
        angles = np.arange(ctx.context, dtype=np.float64)[:, None] * inv_freq.const_value.numpy()
        for name, table in zip(names, (np.cos(angles), np.sin(angles))):
            add_initializer(graph, ir.tensor((table * factor).astype(np_dtype), name=name))
    return graph.initializers[names[0]], graph.initializers[names[1]]


@dataclass(frozen=True)
class _GraphInputs:
    """What every GroupQueryAttention of the graph shares: int32 ``seqlens_k [B]``,
    ``total_sequence_length []``, ``query_seqlens [B]`` (None when not wanted), and
    ``padding_bias [B, 1, S, T]`` float32 (0 for a token, MASKED_BIAS for a pad key)."""

    seqlens_k: ir.Value
    total_sequence_length: ir.Value
    query_seqlens: ir.Value | None
    padding_bias: ir.Value


def _graph_inputs(graph: ir.Graph, anchor: ir.Node, query_seqlens: bool) -> _GraphInputs:
    """Computed once from ``attention_mask [B, T]`` and the shape of ``input_ids [B, S]``."""
    inputs = {v.name: v for v in graph.inputs}
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    int32 = ir.DataType.INT32

    def constant(name, array):
        return add_initializer(graph, ir.tensor(array, name=f"gqa.{name}"))

    one = constant("one", np.array([1], np.int32))
    axis0 = constant("axis0", np.array([0], np.int64))
    nodes = [
        ir.node("Shape", [mask], {"start": 0, "end": 1}, name="gqa/batch"),
        ir.node("Shape", [mask], {"start": 1, "end": 2}, name="gqa/total64"),
        ir.node("Shape", [ids], {"start": 1, "end": 2}, name="gqa/new64"),
    ]
    batch, total64, new64 = (n.outputs[0] for n in nodes)
    cast_total = ir.node("Cast", [total64], {"to": int32}, name="gqa/total_1")
    total_1 = cast_total.outputs[0]
    last = ir.node("Sub", [total_1, one], name="gqa/last")
    seqlens = ir.node("Expand", [last.outputs[0], batch], name="gqa/seqlens_k")
    total = ir.node("Squeeze", [total_1, axis0], name="gqa/total_sequence_length")
    nodes += [cast_total, last, seqlens, total]
    query = None
    if query_seqlens:
        cast_new = ir.node("Cast", [new64], {"to": int32}, name="gqa/new")
        query = ir.node("Expand", [cast_new.outputs[0], batch], name="gqa/query_seqlens")
        nodes += [cast_new, query]
    pad = ir.node("Equal", [mask, constant("zero64", np.array(0, np.int64))], name="gqa/pad")
    pad_bias = ir.node(
        "Where",
        [
            pad.outputs[0],
            constant("masked", np.array(MASKED_BIAS, np.float32)),
            constant("kept", np.array(0.0, np.float32)),
        ],
        name="gqa/pad_bias",
    )
    bias_B11T = ir.node(
        "Unsqueeze",
        [pad_bias.outputs[0], constant("axes12", np.array([1, 2], np.int64))],
        name="gqa/pad_bias_B11T",
    )
    one64 = constant("one64", np.array([1], np.int64))
    shape = ir.node("Concat", [batch, one64, new64, total64], {"axis": 0}, name="gqa/bias_shape")
    bias = ir.node("Expand", [bias_B11T.outputs[0], shape.outputs[0]], name="gqa/padding_bias")
    nodes += [pad, pad_bias, bias_B11T, shape, bias]
    for node in nodes:
        node.outputs[0].name = node.name
    graph.insert_before(anchor, nodes)
    return _GraphInputs(
        seqlens.outputs[0],
        total.outputs[0],
        query.outputs[0] if query is not None else None,
        bias.outputs[0],
    )


def _causal_window(bias: ir.Value) -> int | None:
    """The window (0 = none) of the causal ``AttentionBias`` call behind ``bias``, or None when
    the bias is anything else: the kernel is always causal and rebuilds the padding mask."""
    node = bias.producer()
    if node is None or node.domain != DOMAIN or node.op_type != "AttentionBias":
        return None
    if attribute(node, "causal") != 1:
        return None
    return int(attribute(node, "window", 0))


def _made_by(value: ir.Value, op_type: str) -> bool:
    """Whether ``value`` is the output of a ``graphattn.<op_type>`` call."""
    node = value.producer()
    return node is not None and node.domain == DOMAIN and node.op_type == op_type


def _document_bias(bias: ir.Value) -> bool:
    """Whether ``bias`` is the block-diagonal mask of packed documents
    (:mod:`graphattn.ops.documents`)."""
    return _made_by(bias, "DocumentAttentionBias")


def _paged(block: Block) -> bool:
    """Whether the block's past is a paged pool read through a block table
    (:mod:`graphattn.paged`)."""
    past = block.inputs.get("past_key")
    return past is not None and _made_by(past, "PagedKV")


def _why_not(block: Block, ctx: Context) -> str | None:
    a = block.attrs
    if _paged(block):
        return (
            "paged KV cache (kv_layout paged): the kernel reads a contiguous [B, Hkv, T, D]"
            " cache with one length per row taken from shapes, not a pool through a block"
            " table, and on CPU refuses a batch of several rows with several new tokens"
            " after a past"
        )
    if not {"attention_mask", "input_ids"} <= {v.name for v in ctx.graph.inputs}:
        return "the graph has no attention_mask/input_ids to derive the kernel's lengths from"
    if not a.causal:
        return "the kernel is always causal; this block is not"
    if a.alibi:
        return "ALiBi: the kernel has no per-head position bias (its mask input is padding only)"
    if a.head_dim % 16:
        return f"head_dim {a.head_dim} is not a multiple of 16"
    if _document_bias(block.inputs["bias"]):
        return (
            "packed documents (segment_ids): the kernel's mask is padding only and it rotates"
            " by cache slot, not by position within the document"
        )
    if _causal_window(block.inputs["bias"]) != a.window:
        return "the mask is not the decoder's causal attention_mask bias with this window"
    if a.rope != "none":
        frequencies = _static_frequencies(block)
        if isinstance(frequencies, str):
            return frequencies
        if (a.rotary_dim // 2) % 8:
            return (
                f"the kernel needs a cos/sin width that is a multiple of 8, got {a.rotary_dim // 2}"
            )
    return None


def _apply(block: Block, ctx: Context) -> None:
    e, a = Emitter(ctx, block), block.attrs
    if "gqa" not in ctx.shared:
        ctx.shared["gqa"] = _graph_inputs(ctx.graph, next(iter(ctx.graph)), ctx.query_seqlens)
    shared = ctx.shared["gqa"]
    q, k, v = projections(e, block)
    tables = (None, None)
    if a.rope != "none":
        inv_freq, factor = _static_frequencies(block)
        tables = _rotary_tables(ctx, inv_freq, factor)
    # causality (and a window) by the kernel itself; the bias only drops pad keys
    bias = e.like_activations(shared.padding_bias, q, "bias")
    attrs = {
        "num_heads": a.num_heads,
        "kv_num_heads": a.kv_heads,
        "scale": a.scale,
        "do_rotary": int(a.rope != "none"),
        "rotary_interleaved": int(a.rope == "interleaved"),
    }
    if a.window:
        attrs["local_window_size"] = a.window
    if a.softcap:
        attrs["softcap"] = a.softcap
    inputs = [q, k, v, block.inputs["past_key"], block.inputs["past_value"]]
    inputs += [shared.seqlens_k, shared.total_sequence_length, *tables, None, bias]
    if a.sinks:
        inputs.append(e.like_activations(block.inputs["sinks"], q, "sinks"))
    if shared.query_seqlens is not None:
        inputs += [None] * (QUERY_SEQLENS_INPUT - len(inputs)) + [shared.query_seqlens]
    output, key, value = e.op(
        "GroupQueryAttention", inputs, attrs, label="gqa", outputs=3, domain=MS_DOMAIN
    )
    ctx.graph.opset_imports[MS_DOMAIN] = 1
    replace_block(ctx, block, output_projection(e, block, output), key, value)


GROUPED_QUERY_RULE = Rule("GroupQueryAttention", _why_not, _apply)


def feed_packed_qkv(graph: ir.Graph) -> int:
    """Where a GroupQueryAttention's q, k, v are the three outputs of one Split of a packed
    projection (in that order), feed the packed projection instead and drop the Split."""
    count = 0
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or node.domain != MS_DOMAIN:
            continue
        query, key, value = node.inputs[:3]
        split = query.producer() if query is not None else None
        if (
            split is None
            or split.op_type != "Split"
            or len(split.outputs) != 3
            or attribute(split, "axis") not in (-1, 2)
            or [query, key, value] != list(split.outputs)
            or any(len(v.uses()) != 1 or v.is_graph_output() for v in split.outputs)
        ):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        graph.remove(split, safe=True)
        count += 1
    return count


def shares_kv_buffer(model: ir.Model) -> bool:
    """Whether the graph's attention can write its present into its past buffer: every
    ``present.*`` output comes from GroupQueryAttention (a layer left to Attention, or a
    sparse layer, concatenates its past and cannot read a buffer of the cache's capacity)."""
    presents = [v for v in model.graph.outputs if (v.name or "").startswith("present.")]
    producers = [v.producer() for v in presents]
    return bool(presents) and all(
        p is not None and p.op_type == "GroupQueryAttention" for p in producers
    )
