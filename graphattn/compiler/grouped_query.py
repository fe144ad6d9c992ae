"""Lower decoder attention blocks to ``com.microsoft.GroupQueryAttention`` (target ``ort``).

    SplitHeads → RotaryHalves → Concat(past) → ScaledDotProductAttention → MergeHeads
becomes one
    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache, attention_bias=padding_bias[, query_seqlens])

with RoPE done inside the kernel (``do_rotary``) from ``[context, R]`` cos/sin tables computed
here in NumPy, and, after MatMul packing, the packed q/k/v projection fed to it directly
(:func:`feed_packed_qkv`), so the block has no Split, no RotaryEmbedding and no Concat.

Positions. The kernel rotates the token in cache slot ``t`` by angle ``t·inv_freq``. For a
left-padded row that is the model's position plus the row's pad count: every query and key of
the row is shifted by the same amount, and RoPE scores depend only on position differences,
so the attention is the same (to float rounding) as with ``position_ids``. Causality and a
sliding window (``local_window_size``) are the kernel's own; ``attention_bias`` only drops pad
keys. Blocks whose bias is not a causal ``AttentionBias`` call keep opset-23 Attention (the
kernel is always causal).

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

from graphattn.compiler.attention3d import AttentionBlock, match_block
from graphattn.compiler.rewrite import MS_DOMAIN, add_initializer, attribute, cast_like
from graphattn.ops.domain import DOMAIN, MASKED_BIAS

DEFAULT_CONTEXT = 4096
QUERY_SEQLENS_INPUT = 16  # GroupQueryAttention's input index of query_seqlens (1.32+)


def _inverse_frequencies(rotary: ir.Node) -> ir.Value | None:
    """The constant ``inv_freq [R]`` behind a rotary call's cos/sin, or None."""
    cos = rotary.inputs[1]
    producer = cos.producer() if cos is not None else None
    if producer is None or producer.op_type != "RotaryCosSin":
        return None
    inv_freq = producer.inputs[1]
    return inv_freq if inv_freq.const_value is not None else None


def _head_dim(block: AttentionBlock) -> int | None:
    """D from the past key's shape ``[B, Hkv, P, D]`` (a graph input), or None if unknown."""
    shape = block.pasts[0].shape
    return shape[-1] if shape is not None and isinstance(shape[-1], int) else None


def _rotary_tables(graph: ir.Graph, block: AttentionBlock, context: int, np_dtype):
    """(cos_cache, sin_cache) ``[context, R]`` initializers shared by every layer, or None
    when the block's RoPE cannot be read (then it is not lowered)."""
    source = _inverse_frequencies(block.q_rotary)
    if source is None or _inverse_frequencies(block.k_rotary) is not source:
        return None
    inv_freq = source.const_value.numpy().astype(np.float64)
    if len(inv_freq) % 8:
        return None  # the kernel needs a cos/sin width that is a multiple of 8
    names = [f"{source.name}.{kind}_cache" for kind in ("cos", "sin")]
    if names[0] not in graph.initializers:
        angles = np.arange(context, dtype=np.float64)[:, None] * inv_freq[None, :]
        for name, table in zip(names, (np.cos(angles), np.sin(angles))):
            add_initializer(graph, ir.tensor(table.astype(np_dtype), name=name))
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
    the bias is anything else: the kernel is always causal, so only such blocks are lowered."""
    node = bias.producer()
    if node is None or node.domain != DOMAIN or node.op_type != "AttentionBias":
        return None
    if attribute(node, "causal") != 1:
        return None
    return int(attribute(node, "window", 0))


def fuse_grouped_query_blocks(
    graph: ir.Graph, context: int, float_dtype: ir.DataType, query_seqlens: bool = False
) -> int:
    """Rewrite every matching block (with RoPE on both q and k, or on neither); returns how
    many. ``context`` sizes the cos/sin tables (positions the kernel may rotate);
    ``query_seqlens`` feeds that input (onnxruntime 1.32+; at most 16 inputs before)."""
    np_dtype = np.float16 if float_dtype == ir.DataType.FLOAT16 else np.float32
    if not {"attention_mask", "input_ids"} <= {v.name for v in graph.inputs}:
        return 0  # the kernel's lengths come from these decoder inputs
    shared = None
    count = 0
    for node in list(graph):
        block = match_block(node)
        if block is None or (block.q_rotary is None) != (block.k_rotary is None):
            continue
        head_dim = _head_dim(block)
        if head_dim is None or head_dim % 16:
            continue  # the kernel needs head_size % 16 == 0
        window = _causal_window(block.bias)
        if window is None:
            continue
        tables = (None, None)
        if block.q_rotary is not None:
            if block.q_rotary.op_type != block.k_rotary.op_type:
                continue
            tables = _rotary_tables(graph, block, context, np_dtype)
            if tables is None:
                continue
        if shared is None:
            shared = _graph_inputs(graph, next(iter(graph)), query_seqlens)
        scope = node.name
        query_BSC, key_BSC, value_BSC = block.projections_BSC
        # causality (and a window) by the kernel itself; the bias only drops pad keys
        bias = shared.padding_bias
        if np_dtype is not np.float32:
            bias = cast_like(graph, node, bias, query_BSC, f"{scope}/bias")
        attrs = {
            "num_heads": block.heads,
            "kv_num_heads": block.kv_heads,
            "scale": float(attribute(node, "scale")),
            "do_rotary": int(block.q_rotary is not None),
            "rotary_interleaved": int(
                block.q_rotary is not None and block.q_rotary.op_type == "RotaryInterleaved"
            ),
        }
        if window:
            attrs["local_window_size"] = window
        if node.op_type.endswith("Softcap"):
            attrs["softcap"] = float(attribute(node, "softcap"))
        inputs = [query_BSC, key_BSC, value_BSC, *block.pasts]
        inputs += [shared.seqlens_k, shared.total_sequence_length, *tables, None, bias]
        if shared.query_seqlens is not None:
            inputs += [None] * (QUERY_SEQLENS_INPUT - len(inputs)) + [shared.query_seqlens]
        gqa = ir.node(
            "GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, num_outputs=3, name=scope
        )
        graph.insert_before(node, gqa)
        block.replace(graph, *gqa.outputs)
        count += 1
    if count:
        graph.opset_imports[MS_DOMAIN] = 1
    return count


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
    """Whether the graph's attention can write its present into its past buffer."""
    return any(n.op_type == "GroupQueryAttention" for n in model.graph)
