"""The compile pipeline: target lowering, then precision, then cleanup.

Targets: ``functions`` (graphattn functions kept, for reading), ``portable`` (standard ONNX
only), ``ort`` (portable plus onnxruntime contrib fusions). Precisions: ``fp32``, ``fp16``,
``int8``, ``int4`` (weight-only, MatMulNBits).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

from graphattn.compiler.embeddings import quantize_embeddings
from graphattn.compiler.grouped_query import (
    DEFAULT_CONTEXT,
    QUERY_SEQLENS_INPUT,
    feed_packed_qkv,
    shares_kv_buffer,
)
from graphattn.compiler.load_time_dequant import dequantize_at_load
from graphattn.compiler.moe import lower_moe_blocks
from graphattn.compiler.ort_fusions import fuse_skip_rms_norm
from graphattn.compiler.ort_version import (
    DEFAULT_ORT_VERSION,
    OLDEST_ORT_VERSION,
    QUERY_SEQLENS_SINCE,
    check_ort_version,
    has_query_seqlens,
)
from graphattn.compiler.pack import pack_matmuls
from graphattn.compiler.portable import lower_portable
from graphattn.compiler.quantize import Prequantized, quantize_weights
from graphattn.spec import CONTEXT_KEY, CONTINUATION_KEY, KV_BUFFER_KEY, MIN_ORT_KEY

TARGETS = ("functions", "portable", "ort")
PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class CompileOptions:
    """What to compile to. ``block_size`` applies to int4/int8; ``quantize_lm_head`` also
    quantizes the output projection (embeddings stay a float Gather). ``accuracy_level`` is
    MatMulNBits' compute type: 4 = int8 activations (fast on CPU; onnxruntime's int8 weights
    have no fast path without it), 0 = float. ``grouped_query`` (ort target): attention as
    GroupQueryAttention with fused RoPE where a block fits, else opset-23 Attention.
    ``symmetric``: int4/int8 with the default zero point 2^(bits−1) (no zero-point tensor,
    slightly faster kernels, coarser than the asymmetric default). ``quantize_embeddings``
    (ort, int4/int8; portable keeps float Gathers): embedding tables as
    GatherBlockQuantized, sharing a tied output projection's blocks. ``ort_version``: the
    onnxruntime the graph must load in (``"X.Y"``, default the newest on both PyPI and npm);
    the lowering uses only kernel inputs that version accepts. ``dequantize_at_load``
    (int4/int8 on portable or ort): store the weights as blocks rebuilt by Cast/Mul/Add nodes
    that onnxruntime constant-folds at load, so compute is float32 (no MatMulNBits,
    DequantizeLinear or GatherBlockQuantized; see ``load_time_dequant``). ``moe_kernel``
    (ort): mixture-of-experts blocks as com.microsoft kernels where they fit and were
    measured faster (``measured``: QMoE for int4/int8, the portable experts for float),
    ``always`` (MoE/QMoE wherever they fit) or ``never`` (see ``compiler.moe``)."""

    target: str = "portable"
    precision: str = "fp32"
    block_size: int = 32
    quantize_lm_head: bool = True
    accuracy_level: int = 4
    grouped_query: bool = True
    symmetric: bool = False
    quantize_embeddings: bool = True
    ort_version: str = DEFAULT_ORT_VERSION
    dequantize_at_load: bool = False
    moe_kernel: str = "measured"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ort_version", check_ort_version(self.ort_version))
        if self.dequantize_at_load and (
            self.precision not in ("int4", "int8") or self.target not in ("portable", "ort")
        ):
            raise ValueError(
                "dequantize_at_load needs precision int4 or int8 and target portable or ort,"
                f" got precision {self.precision!r}, target {self.target!r}"
            )
        if self.moe_kernel not in ("measured", "always", "never"):
            raise ValueError(
                f"moe_kernel must be measured, always or never, got {self.moe_kernel!r}"
            )
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.precision in ("int4", "int8") and self.target == "functions":
            raise ValueError(f"precision {self.precision} needs target portable or ort")

    @property
    def bits(self) -> int | None:
        """4 or 8 for the integer precisions, else None."""
        return {"int4": 4, "int8": 8}.get(self.precision)


# onnxscript's SlicesSplit rewrite (two Slices of one tensor → one Split) matches each Slice
# against every other Slice of the graph, rescanning the graph each time: quadratic in Slice
# nodes. Graphs with more than this many (sparse attention: ~150 per layer) skip the rule
# (a 4-layer model with 3 sparse layers: 33 s → 2 s per export); dense decoders have a few.
MAX_SLICES_FOR_SPLIT_RULE = 64


def optimize(model: ir.Model) -> None:
    """Constant folding and dead-code removal (onnxscript optimizer), so the saved graph needs
    no further work at load; functions are already inlined for these targets. One iteration:
    a second one changes nothing in our decoders (SmolLM2 int4: the same 356 nodes) and costs
    0.9 s of a 4 s export. See :data:`MAX_SLICES_FOR_SPLIT_RULE`."""
    import onnxscript.optimizer
    import onnxscript.rewriter as rewriter

    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    slices = sum(1 for node in model.graph if node.op_type == "Slice")
    if default is not None and slices > MAX_SLICES_FOR_SPLIT_RULE:
        rewriter._DEFAULT_REWRITE_RULES = tuple(
            rule for rule in default if getattr(rule, "name", "") != "SlicesSplit"
        )
    try:
        onnxscript.optimizer.optimize(
            model, num_iterations=1, onnx_shape_inference=False, inline=False
        )
    finally:
        if default is not None:
            rewriter._DEFAULT_REWRITE_RULES = default


def _drop_unread_position_ids(graph: ir.Graph) -> None:
    """GroupQueryAttention places RoPE by cache slot: a graph that no longer reads
    ``position_ids`` loses the input (as the I/O convention has it: only where needed)."""
    for index, value in enumerate(graph.inputs):
        if value.name == "position_ids" and not value.uses():
            graph.inputs.pop(index)
            return


def _record_runtime_needs(model: ir.Model) -> None:
    """Write the oldest onnxruntime that runs the graph (``MIN_ORT_KEY``) and, for
    GroupQueryAttention without ``query_seqlens``, that a batch continuing after a past must
    be fed one token per call (``CONTINUATION_KEY``: the runtime does that, exactly)."""
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    with_lengths = [n for n in gqa if len(n.inputs) > QUERY_SEQLENS_INPUT]
    needed = QUERY_SEQLENS_SINCE if with_lengths else OLDEST_ORT_VERSION
    model.metadata_props[MIN_ORT_KEY] = needed
    if gqa and not with_lengths:
        model.metadata_props[CONTINUATION_KEY] = "one_token"
    else:
        model.metadata_props.pop(CONTINUATION_KEY, None)


def compile_model(
    model: ir.Model, options: CompileOptions, prequantized: Prequantized | None = None
) -> ir.Model:
    """Lower ``model`` (in place) to ``options.target``; returns it.

    ``prequantized`` maps weight initializer names to already-quantized blocks (GGUF) that
    int4/int8 use as they are instead of quantizing the float weights."""
    if options.target in ("portable", "ort"):
        lower_moe_blocks(
            model,
            target="portable" if options.moe_kernel == "never" else options.target,
            bits=options.bits,
            block_size=options.block_size,
            symmetric=options.symmetric,
            accuracy_level=options.accuracy_level,
            ort_version=options.ort_version,
            dequantize_at_load=options.dequantize_at_load,
            prequantized=prequantized or {},
            float_kernel=options.moe_kernel == "always",
        )
        context = None
        if options.target == "ort" and options.grouped_query:
            context = int(model.metadata_props.get(CONTEXT_KEY, DEFAULT_CONTEXT))
        lower_portable(
            model,
            grouped_query_context=context,
            query_seqlens=has_query_seqlens(options.ort_version),
        )
        optimize(model)
        prequantized = dict(prequantized or {})
        pack_matmuls(model.graph, prequantized)
    if options.target == "ort":
        feed_packed_qkv(model.graph)
        fuse_skip_rms_norm(model.graph)
    if options.dequantize_at_load:
        dequantize_at_load(
            model,
            bits=options.bits,
            block_size=options.block_size,
            quantize_lm_head=options.quantize_lm_head,
            quantize_embeddings=options.quantize_embeddings,
            prequantized=prequantized,
            symmetric=options.symmetric,
        )
    elif options.bits is not None:
        quantize_weights(
            model,
            bits=options.bits,
            block_size=options.block_size,
            standard=options.target == "portable",
            quantize_lm_head=options.quantize_lm_head,
            prequantized=prequantized,
            accuracy_level=options.accuracy_level,
            symmetric=options.symmetric,
        )
    quantized_gathers = options.target == "ort" and not options.dequantize_at_load
    if options.quantize_embeddings and quantized_gathers and options.bits is not None:
        quantize_embeddings(
            model.graph,
            bits=options.bits,
            block_size=options.block_size,
            symmetric=options.symmetric,
            keep_float=set(prequantized or ()),
        )
    common.RemoveUnusedNodesPass()(model)
    _drop_unread_position_ids(model.graph)
    if shares_kv_buffer(model):
        model.metadata_props[KV_BUFFER_KEY] = "shared"
    _record_runtime_needs(model)
    model.metadata_props["graphattn.target"] = options.target
    model.metadata_props["graphattn.precision"] = options.precision
    return model
