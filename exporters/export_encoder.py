"""Export an encoder checkpoint (BERT, ModernBERT): ``model.onnx`` + ``model.onnx.data``, the
checkpoint's ``config.json`` and tokenizer files (``vocab.txt`` too). No ``genai_config.json``:
ONNX Runtime GenAI runs decoders only. The graph's I/O is Optimum's feature-extraction one
(:mod:`graphattn.encoder`), so Optimum's ``ORTModelForFeatureExtraction`` and
transformers.js' ``feature-extraction`` pipeline read the same names.

The weights go through the decoder export's checks and lazy reads
(:func:`graphattn.exporters.export.plan_weights`, ``lazy_tensors``), and the graph through
the same compiler (targets ``functions`` / ``portable`` / ``ort``, precisions fp32, fp16,
int8, int4).
"""

from __future__ import annotations

import time
from pathlib import Path

from graphattn.compiler import CompileOptions, compile_model
from graphattn.encoder import ENCODER_KEY, build_encoder
from graphattn.exporters.checkpoint import copy_present
from graphattn.exporters.output_dir import staged_directory
from graphattn.exporters.safetensors_reader import CheckpointError
from graphattn.models.encoders import encoder_architecture

ENCODER_FILES = ("config.json", "vocab.txt")  # besides the decoders' tokenizer files
MARKERS = ("model.onnx",)


def is_encoder(config) -> bool:
    """Whether an HF ``config.json`` (dict) is an encoder this package builds."""
    return isinstance(config, dict) and encoder_architecture(config) is not None


def export_encoder(
    source,
    out_dir: str | Path,
    options: CompileOptions,
    *,
    sentence_embedding: bool = False,
    layout: str = "genai",
    progress=None,
):
    """Export the opened checkpoint ``source`` (an HF directory) as an encoder; returns an
    :class:`~graphattn.exporters.export.ExportResult` (``genai_config`` is the copied
    ``config.json``)."""
    from graphattn.exporters.export import (
        DATA_FILE,
        DTYPES,
        MODEL_FILE,
        ExportResult,
        lazy_tensors,
        plan_weights,
        save_model,
        write_tokenizer_or_warn,
    )

    if layout != "genai":
        raise ValueError(f"layout {layout!r} is for decoders; an encoder export has one layout")
    if not hasattr(source, "directory") or not (Path(source.directory) / "config.json").is_file():
        raise CheckpointError("encoders export from an HF checkpoint directory only")
    started = time.perf_counter()
    architecture = encoder_architecture(source.config)
    cfg = architecture.config_from_hf(source.config)
    plan = plan_weights(source, architecture, cfg)
    float_dtype = "fp16" if options.precision == "fp16" else "fp32"
    model = build_encoder(
        cfg,
        lazy_tensors(source, plan, float_dtype),
        dtype=DTYPES[float_dtype][0],
        with_sentence_embedding=sentence_embedding,
    )
    compile_model(model, options)
    model.metadata_props["graphattn.dtype"] = float_dtype
    model.metadata_props[ENCODER_KEY] = cfg.model_type
    parameters = sum(_count(s.graph_shape) for s in {s.name: s for s in plan.values()}.values())

    def callback(tensor, info) -> None:
        if progress is not None:
            progress(info.index + 1, info.total, tensor.name or "")

    with staged_directory(out_dir, MARKERS) as staging:
        save_model(model, staging, callback)
        copied, warnings = write_tokenizer_or_warn(source, staging)
        copied += [
            name
            for name in copy_present(Path(source.directory), staging, ENCODER_FILES)
            if name not in copied
        ]
    out = Path(out_dir).absolute()
    return ExportResult(
        out_dir=out,
        model=out / MODEL_FILE,
        data=out / DATA_FILE,
        genai_config=out / "config.json",
        tokenizer_files=[out / name for name in copied if name != "config.json"],
        config=cfg,
        parameters=parameters,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total
