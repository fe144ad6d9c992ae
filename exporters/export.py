"""The export pipeline: HF checkpoint directory → ``model.onnx`` + ``model.onnx.data`` +
``genai_config.json`` + tokenizer files.

Never imports torch. Every expected tensor is checked (present, shape as the config implies)
and unexpected tensors are reported before any data is read; weights are then read one at a
time through a memory map while they are written, so peak memory stays near one copy.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphattn import paged
from graphattn.builder import build_decoder
from graphattn.compiler import CompileOptions, compile_model
from graphattn.compiler.ort_version import DEFAULT_ORT_VERSION
from graphattn.exporters.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    open_checkpoint,
    pickle_refused,
)
from graphattn.exporters.genai_config import describe_graph, genai_config
from graphattn.exporters.output_dir import staged_directory
from graphattn.exporters.safetensors_reader import CheckpointError
from graphattn.exporters.transformersjs_layout import ONNX_DIR, arrange, model_file_name
from graphattn.models import architecture_for
from graphattn.spec import Architecture, ModelConfig, WeightSource, row_span

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_TARGET = "ort"  # measured fastest on CPU: see README "Against the field"
DTYPES = {"fp32": (ir.DataType.FLOAT, np.float32), "fp16": (ir.DataType.FLOAT16, np.float16)}
# Directory layouts: "genai" (ONNX Runtime GenAI: model.onnx at the top) or "transformers.js"
# (onnx/model{_q4,...}.onnx + config.json, see graphattn.exporters.transformersjs_layout).
LAYOUTS = ("genai", "transformers.js")

Progress = Callable[[int, int, str], None]


@dataclass
class ExportResult:
    """What an export wrote, and a few facts for the summary line."""

    out_dir: Path
    model: Path
    data: Path
    genai_config: Path
    tokenizer_files: list[Path] = field(default_factory=list)
    layout_files: list[Path] = field(default_factory=list)
    config: ModelConfig | None = None
    parameters: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. tokenizer not written

    @property
    def paths(self) -> list[Path]:
        """Every file written."""
        return [self.model, self.data, self.genai_config, *self.tokenizer_files, *self.layout_files]


def open_source(checkpoint: str | Path):
    """An HF directory, a ``.gguf`` file, or a known model name (fetched on first use)."""
    from graphattn.exporters.fetch import KNOWN_MODELS, fetch

    path = Path(checkpoint)
    if not path.exists() and str(checkpoint) in KNOWN_MODELS:
        path = fetch(str(checkpoint))
    if path.is_file():
        if path.suffix == ".gguf":
            from graphattn.exporters.gguf_reader import GGUFCheckpoint

            return GGUFCheckpoint(path)
        if path.suffix in PICKLE_SUFFIXES:
            raise pickle_refused(path)
        raise CheckpointError(f"{path}: expected an HF checkpoint directory or a .gguf file")
    return open_checkpoint(path)


def plan_weights(checkpoint: Checkpoint, architecture: Architecture, cfg: ModelConfig):
    """{role: WeightSource}, after checking every tensor against the checkpoint headers."""
    plan = {
        role: source
        for role, source in architecture.weights(cfg).items()
        if not source.optional or source.source in checkpoint.tensors
    }
    used = set()
    for source in plan.values():
        entry = checkpoint.tensors.get(source.source)
        if entry is None:
            raise CheckpointError(f"{checkpoint.directory}: missing tensor {source.source!r}")
        if entry.shape != source.shape:
            raise CheckpointError(
                f"{entry.path}: tensor {source.source!r} has shape {list(entry.shape)},"
                f" config implies {list(source.shape)}"
            )
        used.add(source.source)
    ignorable = tuple(architecture.ignored)
    prefixes = tuple(architecture.ignored_prefixes)
    unexpected = sorted(
        name
        for name in checkpoint.tensors
        if name not in used
        and not name.endswith(ignorable)
        and not (prefixes and name.startswith(prefixes))
        and not (cfg.tie_word_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{checkpoint.directory}: unexpected tensors {shown}{more}")
    return plan


def lazy_tensors(checkpoint: Checkpoint, plan: dict[str, WeightSource], dtype: str):
    """{role: ir.LazyTensor} reading and fixing each weight only when it is written.

    A checkpoint tensor that feeds several graph tensors (GPT-OSS's fused expert tensors,
    sliced per expert; a fused QKV) is read once while its slices are written one after the
    other: the last such tensor read is kept until another one is read."""
    ir_dtype, np_dtype = DTYPES[dtype]
    tensors = {}
    by_name: dict[str, ir.LazyTensor] = {}
    sliced = Counter(source.source for source in {s.name: s for s in plan.values()}.values())
    last_read: dict[str, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        if sliced[name] < 2:
            return checkpoint.load(name)
        if name not in last_read:
            last_read.clear()
            last_read[name] = checkpoint.load(name)
        return last_read[name]

    for role, source in plan.items():
        if source.name not in by_name:

            def load(source=source) -> ir.Tensor:
                array = read(source.source)
                if source.transform is not None:
                    array = source.transform(array)
                return ir.tensor(np.ascontiguousarray(array, dtype=np_dtype), name=source.name)

            by_name[source.name] = ir.LazyTensor(
                load, dtype=ir_dtype, shape=ir.Shape(source.graph_shape), name=source.name
            )
        tensors[role] = by_name[source.name]
    return tensors


def _save_options(callback) -> dict:
    """ir.save options: one tensor in flight at a time where this onnx-ir supports it."""
    supported = inspect.signature(ir.save).parameters
    wanted = {
        "size_threshold_bytes": 1024,  # small shape constants stay inline for shape inference
        "max_workers": 1,
        "max_in_flight_bytes": 64 * 1024 * 1024,
        "callback": callback,
    }
    return {key: value for key, value in wanted.items() if key in supported}


def lossless_kinds(options: CompileOptions) -> tuple[str, ...]:
    """GGUF block formats used as they are for this precision and target.

    int4 keeps Q4_0/Q4_1 (4-bit) and Q8_0 (8-bit) blocks exactly; int8 keeps only Q8_0 and
    re-quantizes the rest to 8 bits. Standard DequantizeLinear has no float zero point, so the
    portable target re-quantizes Q4_1 (unless ``dequantize_at_load``, which adds the offsets)."""
    kinds = ("Q4_0", "Q4_1", "Q8_0") if options.bits == 4 else ("Q8_0",)
    if options.target == "portable" and not options.dequantize_at_load:
        kinds = tuple(k for k in kinds if k != "Q4_1")
    return kinds


def _block_rows(blocks, span: tuple[int, int] | None):
    """The blocks of rows ``span`` (output features) of a block-quantized weight: a fused
    GGUF tensor cut like its float rows (Phi-3's ``attn_qkv``), still exact."""
    if span is None:
        return blocks
    start, stop = span
    return dataclasses.replace(
        blocks,
        q=blocks.q[start:stop],
        scales=blocks.scales[start:stop],
        zero_points=blocks.zero_points[start:stop],
        mins=None if blocks.mins is None else blocks.mins[start:stop],
    )


def write_tokenizer_or_warn(source, out_dir: Path) -> tuple[list[str], list[str]]:
    """(tokenizer files written, warnings): a tokenizer of a kind we cannot build (a GGUF's
    :class:`UnsupportedTokenizerError`) is one warning and no files; anything else raises."""
    from graphattn.exporters.gguf_tokenizer import UnsupportedTokenizerError

    try:
        return source.write_tokenizer(out_dir), []
    except UnsupportedTokenizerError as error:
        return [], [error.warning()]


def save_model(model: ir.Model, directory: Path, callback=None) -> None:
    """Write ``model.onnx`` + one ``model.onnx.data`` into ``directory``."""
    ir.save(model, directory / MODEL_FILE, external_data=DATA_FILE, **_save_options(callback))


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    target: str = DEFAULT_TARGET,
    dtype: str | None = None,
    block_size: int = 32,
    quantize_lm_head: bool = True,
    accuracy_level: int = 4,
    requantize: bool = False,
    grouped_query: bool = True,
    symmetric: bool = False,
    quantize_embeddings: bool = True,
    ort_version: str = DEFAULT_ORT_VERSION,
    dequantize_at_load: bool = False,
    moe_kernel: str = "measured",
    last_logits_only: bool = True,
    layout: str = "genai",
    progress: Progress | None = None,
    sentence_embedding: bool = False,
    segment_ids: bool = False,
    kv_layout: str = "contiguous",
    kv_block_size: int = paged.DEFAULT_KV_BLOCK_SIZE,
) -> ExportResult:
    """Export a checkpoint (HF directory, ``.gguf`` file or known model name) to ``out_dir``.

    ``precision``: ``fp32``, ``fp16`` (weights, KV cache and logits), ``int8`` or ``int4``
    (weight-only, block ``block_size``; a GGUF's Q4_0/Q4_1/Q8_0 blocks are used as they are).
    ``target``: ``functions``, ``portable`` or ``ort`` (see :mod:`graphattn.compiler`).
    ``dtype`` is the older spelling of ``precision`` for ``fp32``/``fp16``.
    ``accuracy_level``: MatMulNBits compute type (4 = int8 activations, 0 = float).
    ``requantize``: quantize a GGUF's dequantized weights afresh (round-to-nearest, faster
    kernels) instead of keeping its Q4_0/Q4_1/Q8_0 blocks exactly.
    ``grouped_query``: the ``ort`` target lowers attention to GroupQueryAttention where the
    kernel takes it (else opset-23 Attention everywhere).
    ``symmetric``: int4/int8 round-to-nearest with zero point 2^(bits−1) (no zero-point
    tensor) instead of per-block asymmetric ranges.
    ``quantize_embeddings``: ``ort`` int4/int8 also store the embedding tables block-quantized
    (GatherBlockQuantized; a tied table shares the output projection's blocks).
    ``ort_version``: the onnxruntime (``"X.Y"``) the graph must load in; the default is the
    newest on both PyPI and npm, so Node.js, browsers and transformers.js load it too.
    ``dequantize_at_load`` (int4/int8): weights stored as blocks that onnxruntime rebuilds
    into float32 once at load (Cast/Mul/Add on initializers), so compute is fp32.
    ``moe_kernel``: mixture-of-experts layers on ``ort``: ``measured`` (onnxruntime's MoE/QMoE
    where it measured faster), ``always`` (wherever it computes the same) or ``never``
    (see :mod:`graphattn.compiler.moe`).
    ``last_logits_only``: logits for the last position only (cheaper prefill).
    ``layout``: ``genai`` (``model.onnx`` + ``model.onnx.data`` beside ``genai_config.json``)
    or ``transformers.js`` (``onnx/model{suffix}.onnx`` + ``.onnx_data``, ``config.json``,
    ``generation_config.json``; see :mod:`graphattn.exporters.transformersjs_layout`).
    ``progress(done, total, tensor_name)`` is called as each tensor is written.
    ``sentence_embedding``: an encoder (BERT, ModernBERT) also outputs the mean-pooled,
    normalized ``sentence_embedding`` (see :mod:`graphattn.exporters.export_encoder`).
    ``segment_ids``: a decoder takes packed sequences: input ``segment_ids [batch_size,
    total_sequence_length]`` (document id per slot, 0 = padding) instead of ``position_ids``
    (see :mod:`graphattn.packing`; :func:`graphattn.runtime.packing.pack` feeds it).
    ``kv_layout``: ``contiguous`` (the default cache) or ``paged`` (decoders, genai layout:
    a pool of ``kv_block_size``-slot blocks per layer read through ``block_table``, per-row
    ``past_lengths``/``query_lengths``, presents of the new tokens only; see
    :mod:`graphattn.paged`). A paged export's ``genai_config.json`` is written for our
    runtime and says that ONNX Runtime GenAI cannot run it.
    """
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if precision not in ("fp32", dtype):
            raise ValueError(f"dtype={dtype!r} conflicts with precision={precision!r}")
        precision = dtype
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    paged.check_layout(kv_layout, kv_block_size)
    if kv_layout == "paged":
        paged.check_export(encoder=False, layout=layout, segment_ids=segment_ids)
    if layout == "transformers.js" and target == "functions":
        raise ValueError("layout 'transformers.js' needs target portable or ort, not functions")
    options = CompileOptions(
        target,
        precision,
        block_size,
        quantize_lm_head,
        accuracy_level,
        grouped_query,
        symmetric,
        quantize_embeddings,
        ort_version,
        dequantize_at_load=dequantize_at_load,
        moe_kernel=moe_kernel,
    )
    float_dtype = "fp16" if precision == "fp16" else "fp32"
    started = time.perf_counter()
    source = open_source(checkpoint)
    from graphattn.exporters.export_encoder import export_encoder, is_encoder

    if is_encoder(source.config):
        if segment_ids:
            raise ValueError("segment_ids (packed sequences) is for decoders, not encoders")
        if kv_layout == "paged":
            paged.check_export(encoder=True, layout=layout)
        return export_encoder(
            source, out_dir, options, sentence_embedding=sentence_embedding, layout=layout,
            progress=progress,
        )  # fmt: skip
    architecture = architecture_for(source.config)
    cfg = architecture.config_from_hf(source.config)
    plan = plan_weights(source, architecture, cfg)
    model = build_decoder(
        cfg,
        lazy_tensors(source, plan, float_dtype),
        dtype=DTYPES[float_dtype][0],
        last_logits_only=last_logits_only,
        segment_ids=segment_ids,
        kv_layout=kv_layout,
        kv_block_size=kv_block_size,
    )
    prequantized = None
    if options.bits is not None and hasattr(source, "block_quantized") and not requantize:
        usable = lossless_kinds(options)
        prequantized = {
            s.name: (
                lambda s=s: _block_rows(source.block_quantized(s.source), row_span(s.transform))
            )
            for s in plan.values()
            if source.block_quantized_kind(s.source) in usable
            and row_span(s.transform) is not False
        }
    compile_model(model, options, prequantized)
    model.metadata_props["graphattn.dtype"] = float_dtype
    parameters = sum(
        int(np.prod(v.graph_shape)) for v in {s.name: s for s in plan.values()}.values()
    )

    def callback(tensor: ir.TensorProtocol, info) -> None:
        if progress is not None:
            progress(info.index + 1, info.total, tensor.name or "")

    with staged_directory(out_dir) as staging:
        save_model(model, staging, callback)
        config = describe_graph(genai_config(cfg, architecture.genai_type or cfg.model_type), model)
        if kv_layout == "paged":
            paged.mark_genai_config(config, kv_block_size)
        (staging / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied, warnings = write_tokenizer_or_warn(source, staging)
        model_file, data_file, moved = MODEL_FILE, DATA_FILE, []
        if layout == "transformers.js":
            moved = arrange(staging, source.config, cfg, precision)
            model_file = f"{ONNX_DIR}/{model_file_name(precision)}"
            data_file = f"{model_file}_data"
    out = Path(out_dir).absolute()
    return ExportResult(
        out_dir=out,
        model=out / model_file,
        data=out / data_file,
        genai_config=out / "genai_config.json",
        tokenizer_files=[out / name for name in copied],
        layout_files=[
            out / p for p in moved if str(p) not in (model_file, data_file, "genai_config.json")
        ],
        config=cfg,
        parameters=parameters,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )


def stderr_progress(done: int, total: int, name: str) -> None:
    """A one-line progress bar over tensors on stderr."""
    width = 30
    filled = width * done // max(total, 1)
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} tensors {name[:40]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
