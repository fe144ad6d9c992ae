"""Lower graphattn functions to standard ONNX (opset 23) where a standard op exists.

Attention blocks first, each by reading its one call (:mod:`graphattn.compiler.blocks`:
GroupQueryAttention on ``ort`` where the kernel fits, else opset-23 Attention); a block no
rule takes is inlined and its small functions lowered one by one:

- ``ScaledDotProductAttention[Softcap]`` → ``Attention`` (the bias as ``attn_mask``, explicit
  ``scale``, ``softcap``); GQA/MQA head counts come from the 4-D shapes;
- ``RotaryHalves`` / ``RotaryInterleaved`` → ``RotaryEmbedding`` (cos/sin ``[B, S, R]``,
  ``rotary_embedding_dim = 2R`` read from the inverse-frequency initializer);
- ``RMSNorm`` → ``RMSNormalization`` (float32 statistics, ``stash_type = 1``).

Everything else (masks, MLPs, scalable softmax, ...) is then inlined: the result uses only the
default ONNX domain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphattn.compiler.attention3d import ATTENTION_RULE
from graphattn.compiler.blocks import Context, lower_blocks, record
from graphattn.compiler.grouped_query import GROUPED_QUERY_RULE
from graphattn.compiler.latent import GROUPED, INLINED_PREFIX, LATENT_RULE, keep_grouped
from graphattn.compiler.rewrite import attribute, cast_like, replace_node
from graphattn.ops.domain import DOMAIN
from graphattn.ops.encoder_block import PREFIX as ENCODER_PREFIX
from graphattn.ops.sparse_block import PREFIXES as SPARSE_PREFIXES


def _rotary_dim(node: ir.Node) -> int:
    cos = node.inputs[1]
    producer = cos.producer() if cos is not None else None
    if producer is not None and producer.op_type == "RotaryCosSin":
        inv_freq = producer.inputs[1].const_value
        if inv_freq is not None:
            return 2 * int(inv_freq.shape[0])
    return 0  # RotaryEmbedding's default: the whole head


def _float_dtype(graph: ir.Graph) -> ir.DataType:
    """The model's float type: that of its first float input (the KV cache), else FLOAT."""
    for value in graph.inputs:
        if value.type is not None and value.type.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return value.type.dtype
    return ir.DataType.FLOAT


def lower_to_standard(graph: ir.Graph) -> int:
    """Replace top-level graphattn calls that have a standard equivalent; returns how many."""
    float32 = _float_dtype(graph) == ir.DataType.FLOAT
    count = 0
    for node in list(graph):
        if node.domain != DOMAIN or node.metadata_props.get(GROUPED):
            continue
        if node.op_type in ("ScaledDotProductAttention", "ScaledDotProductAttentionSoftcap"):
            attrs = {"scale": float(attribute(node, "scale")), "is_causal": 0}
            if node.op_type.endswith("Softcap"):
                attrs["softcap"] = float(attribute(node, "softcap"))
            query, key, value, bias = node.inputs[:4]
            if not float32:
                bias = cast_like(graph, node, bias, query, f"{node.name}/bias")
            replace_node(graph, node, "Attention", [query, key, value, bias], attrs, num_outputs=1)
        elif node.op_type in ("RotaryHalves", "RotaryInterleaved"):
            attrs = {
                "interleaved": int(node.op_type == "RotaryInterleaved"),
                "rotary_embedding_dim": _rotary_dim(node),
            }
            x, cos, sin = node.inputs[:3]
            if not float32:
                cos = cast_like(graph, node, cos, x, f"{node.name}/cos")
                sin = cast_like(graph, node, sin, x, f"{node.name}/sin")
            replace_node(graph, node, "RotaryEmbedding", [x, cos, sin], attrs)
        elif node.op_type == "RMSNorm":
            attrs = {"axis": -1, "epsilon": float(attribute(node, "epsilon")), "stash_type": 1}
            replace_node(graph, node, "RMSNormalization", node.inputs[:2], attrs)
        else:
            continue
        count += 1
    return count


@contextlib.contextmanager
def _scoped_inline_names() -> Iterator[None]:
    """While inlining, name nodes and values after their outermost call site
    (``layers.3/mlp/gate`` rather than ``n0_14``), so lowered graphs stay readable.

    onnx_ir's inliner keeps the call stack but does not use it for names yet; this hooks its
    name maker. Where that private hook is missing, inlining proceeds with its own names."""
    from onnx_ir.passes.common import inliner

    original = getattr(inliner, "_make_unique_name", None)
    if original is None:
        yield
        return

    def scoped(name: str, callstack: list[str], used_names: set[str]) -> str:
        scope = callstack[0] if callstack else ""
        if scope and not name.startswith(f"{scope}/"):
            name = f"{scope}/{name}"
        return original(name, callstack, used_names)

    inliner._make_unique_name = scoped
    try:
        yield
    finally:
        inliner._make_unique_name = original


def inline_functions(model: ir.Model) -> None:
    """Inline every model-local function call and drop the definitions."""
    with _scoped_inline_names():
        common.InlinePass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    model.graph.opset_imports.pop(DOMAIN, None)


def lower_attention_blocks(
    model: ir.Model, grouped_query_context: int | None = None, query_seqlens: bool = False
) -> list[dict]:
    """Lower every attention block call (GroupQueryAttention first when
    ``grouped_query_context`` gives the rotary tables' length, with ``query_seqlens`` for
    onnxruntime 1.32+; then Attention); inline those no rule took. Returns the decisions."""
    graph = model.graph
    ctx = Context(graph, _float_dtype(graph), grouped_query_context or 0, query_seqlens)
    rules = [ATTENTION_RULE, LATENT_RULE]
    if grouped_query_context is not None:
        rules.insert(0, GROUPED_QUERY_RULE)
    decisions = lower_blocks(ctx, rules)
    for decision in decisions:  # latent blocks: what their score core computes
        how = ctx.shared.get("latent_detail", {}).get(decision["layer"])
        if how is not None:
            decision["detail"] = how
    if any(d["kernel"] == "decomposed" or "detail" in d for d in decisions):
        with _scoped_inline_names():
            common.InlinePass(
                criteria=lambda f: (
                    f.domain == DOMAIN
                    and f.name.startswith(
                        ("SelfAttention", ENCODER_PREFIX, INLINED_PREFIX, *SPARSE_PREFIXES)
                    )
                )
            )(model)
        keep_grouped(graph, ctx)
    record(model, decisions)
    return decisions


def lower_portable(
    model: ir.Model, grouped_query_context: int | None = None, query_seqlens: bool = False
) -> ir.Model:
    """The model with standard ops only (in place; also returned); with
    ``grouped_query_context``, attention goes to GroupQueryAttention where it fits."""
    lower_attention_blocks(model, grouped_query_context, query_seqlens)
    lower_to_standard(model.graph)
    inline_functions(model)
    return model
