"""Arrange a finished export as transformers.js (``@huggingface/transformers``) loads it.

``pipeline('text-generation', dir)`` in transformers.js 4.3.1 reads (``src/models/session.js``,
``src/utils/model-loader.js``, ``src/utils/dtypes.js``, ``src/configs.js``):

- ``config.json``: ``model_type`` picks the model class and how the cache inputs are named
  (``past_key_values.{i}.key|value`` for ``num_hidden_layers``/``n_layer`` layers). The empty
  cache of the first step is built from the graph's own input shapes, resolving only the
  symbolic dim ``batch_size`` (other names become 0), so no cache sizes are needed here.
  ``transformers.js_config.dtype`` is the dtype used when the caller passes none, and
  ``transformers.js_config.use_external_data_format`` ``{file: chunks}`` says how many
  external-data files to fetch beside each ONNX file.
- ``onnx/model{suffix}.onnx`` with the suffix of the dtype: ``fp32`` → ``model.onnx``,
  ``fp16`` → ``model_fp16.onnx``, ``q4`` → ``model_q4.onnx``, ``q8`` → ``model_quantized.onnx``.
- ``onnx/model{suffix}.onnx_data`` (then ``..._data_1``, ``..._data_2`` … for more chunks):
  in Node the session opens the model by path and onnxruntime finds the data through each
  tensor's ``location``; in browsers the files are fetched and handed over under those names.
  Either way ``location`` must be exactly that file name.
- ``generation_config.json`` (optional to the loader; ``generate`` reads its token ids) and
  ``tokenizer.json`` + ``tokenizer_config.json`` (without ``tokenizer_config.json`` no tokenizer
  is loaded at all).
- ``position_ids`` is fed only when the graph has that input; extra feeds are never needed.

A model whose cache is not key/value (multi-head latent attention: ``latent``/``rope_key``)
is refused (:func:`check_supported`): transformers.js builds and feeds key/value caches only.

``genai_config.json`` stays, its ``filename`` pointing into ``onnx/``, so ONNX Runtime GenAI and
:mod:`graphattn.runtime` load the very same directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx

from graphattn.spec import ModelConfig

ONNX_DIR = "onnx"
# graphattn precision → the transformers.js dtype name a caller passes as `{dtype: ...}`.
# int8 is "q8" (model_quantized.onnx), the dtype transformers.js defaults to on wasm, so a
# browser app that names no dtype finds it too; int4 is "q4" (model_q4.onnx).
PRECISION_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int4": "q4", "int8": "q8"}
# transformers.js DEFAULT_DTYPE_SUFFIX_MAPPING (src/utils/dtypes.js), for the dtypes we write.
DTYPE_SUFFIXES = {"fp32": "", "fp16": "_fp16", "q4": "_q4", "q8": "_quantized"}
# Browsers cannot hold one buffer of 2 GiB or more; transformers.js splits larger data into
# chunks named <file>_data, <file>_data_1, ... (at most 100, src/utils/hub/constants.js).
CHUNK_BYTES = 2_000_000_000
MAX_CHUNKS = 100
# Offsets in a new chunk follow onnx.save's convention: tensors of 1 MiB or more start on a
# 64 KiB boundary (mmap-able), smaller ones on 64 bytes.
_ALIGN_THRESHOLD, _ALIGN_LARGE, _ALIGN_SMALL = 1 << 20, 1 << 16, 64

# Keys of a source config.json that describe its files, not the model: not restated.
_FILE_KEYS = ("transformers.js_config", "quantization_config", "_name_or_path", "auto_map")


def check_supported(cfg: ModelConfig, model: onnx.ModelProto | None = None) -> None:
    """Refuse (ValueError) a model whose cache transformers.js cannot build: it feeds
    ``past_key_values.{i}.key|value`` only, so a latent (MLA) cache — ``.latent``/
    ``.rope_key`` per layer — or any other cache tensor of ``model``'s graph is refused."""
    names = set()
    if model is not None:
        names = {
            i.name.split(".", 2)[2]
            for i in model.graph.input
            if i.name.startswith("past_key_values.") and i.name.count(".") >= 2
        } - {"key", "value"}
    if cfg.latent or names:
        found = ", ".join(sorted(names)) if names else "latent, rope_key"
        raise ValueError(
            "layout transformers.js: this model's KV cache is a multi-head latent attention"
            f" cache (past_key_values.{{i}}.{found.replace(', ', '|')}), but transformers.js"
            " feeds only past_key_values.{i}.key|value caches; export with --layout genai"
            " and run it with graphattn.runtime"
        )


def model_file_name(precision: str) -> str:
    """``model.onnx``, ``model_fp16.onnx``, ``model_q4.onnx`` or ``model_quantized.onnx``."""
    if precision not in PRECISION_DTYPES:
        known = ", ".join(PRECISION_DTYPES)
        raise ValueError(f"precision must be one of {known} for transformers.js, got {precision!r}")
    return f"model{DTYPE_SUFFIXES[PRECISION_DTYPES[precision]]}.onnx"


def chunk_names(model_name: str, count: int) -> list[str]:
    """External-data file names transformers.js asks for (``getExternalDataChunkNames``)."""
    return [f"{model_name}_data" + ("" if i == 0 else f"_{i}") for i in range(count)]


def hf_config(source_config: Mapping[str, object], cfg: ModelConfig, precision: str, chunks: int):
    """``config.json``: the checkpoint's own (for a GGUF, the HF config its metadata maps to),
    so transformers.js picks the family's class and cache names from the family's keys, plus
    the token ids, the precision and the ``transformers.js_config`` block naming the dtype and
    the external-data chunk count."""
    if not source_config.get("model_type"):
        raise ValueError("the checkpoint config has no model_type for transformers.js")
    config = {k: v for k, v in source_config.items() if k not in _FILE_KEYS}
    # transformers.js sizes the cache from head_dim when present, else hidden / heads: state
    # the graph's (they differ for Gemma-style head sizes)
    config.setdefault("head_dim", cfg.head_dim)
    config |= _token_ids(cfg)
    dtype = PRECISION_DTYPES[precision]
    config |= {
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float16" if precision == "fp16" else "float32",
        "use_cache": True,
        "transformers.js_config": {
            "dtype": dtype,
            "use_external_data_format": {model_file_name(precision): chunks},
        },
    }
    return config


def generation_config(cfg: ModelConfig) -> dict:
    """``generation_config.json``: the token ids ``generate`` stops on and pads with."""
    return _token_ids(cfg)


def _token_ids(cfg: ModelConfig) -> dict[str, object]:
    ids = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    return {key: value for key, value in ids.items() if value is not None}


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model stored outside the proto: initializers and tensor attributes
    in the graph, its subgraphs and the model-local functions."""

    def in_graph(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            yield from in_nodes([node])

    def in_nodes(nodes) -> Iterator[onnx.TensorProto]:
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from in_graph(attribute.g)
                for graph in attribute.graphs:
                    yield from in_graph(graph)

    tensors = [*in_graph(model.graph)]
    for function in model.functions:
        tensors.extend(in_nodes(function.node))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_fields(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _align(offset: int, length: int) -> int:
    step = _ALIGN_LARGE if length >= _ALIGN_THRESHOLD else _ALIGN_SMALL
    return -(-offset // step) * step


def relocate_external_data(
    model: onnx.ModelProto,
    source_dir: Path,
    target_dir: Path,
    model_name: str,
    chunk_bytes: int = CHUNK_BYTES,
) -> list[str]:
    """Move the model's external data into ``target_dir`` under transformers.js's names and
    point every tensor's ``location`` there; returns the chunk file names (none if the model
    holds all its data inline).

    Data in one file that fits ``chunk_bytes`` is renamed, not copied (same offsets); larger
    data is copied tensor by tensor into chunks of at most ``chunk_bytes`` each (a tensor
    larger than that gets a chunk of its own), and the source files are removed after."""
    tensors = list(external_tensors(model))
    if not tensors:
        return []
    fields = [_fields(t) for t in tensors]
    sources = {f["location"] for f in fields}
    total = max(int(f.get("offset", 0)) + int(f["length"]) for f in fields)
    if len(sources) == 1 and total <= chunk_bytes:
        (name,) = chunk_names(model_name, 1)
        os.replace(source_dir / sources.pop(), target_dir / name)
        for tensor, f in zip(tensors, fields):
            _set_fields(tensor, name, int(f.get("offset", 0)), int(f["length"]))
        return [name]

    # Plan: (tensor, source, source offset, length, chunk index, chunk offset), in file order.
    plan = []
    chunk, used = 0, 0
    ordered = sorted(
        zip(tensors, fields), key=lambda p: (p[1]["location"], int(p[1].get("offset", 0)))
    )
    for tensor, f in ordered:
        length = int(f["length"])
        start = _align(used, length)
        if used and start + length > chunk_bytes:
            chunk, start = chunk + 1, 0
        plan.append((tensor, f["location"], int(f.get("offset", 0)), length, chunk, start))
        used = start + length
    names = chunk_names(model_name, chunk + 1)
    if len(names) > MAX_CHUNKS:
        raise ValueError(f"{len(names)} data chunks; transformers.js reads <= {MAX_CHUNKS}")
    handles = {s: open(source_dir / s, "rb") for s in sources}  # noqa: SIM115 (closed below)
    try:
        for index, name in enumerate(names):
            with open(target_dir / name, "wb") as out:
                for tensor, source, offset, length, c, start in plan:
                    if c != index:
                        continue
                    out.seek(start)
                    handles[source].seek(offset)
                    _copy(handles[source], out, length)
                    _set_fields(tensor, name, start, length)
    finally:
        for handle in handles.values():
            handle.close()
    for source in sources:
        (source_dir / source).unlink()
    return names


def _copy(source, target, length: int, block: int = 64 << 20) -> None:
    while length > 0:
        data = source.read(min(block, length))
        if not data:
            raise ValueError("external data file is shorter than its tensors say")
        target.write(data)
        length -= len(data)


def arrange(
    directory: str | Path,
    source_config: Mapping[str, object],
    cfg: ModelConfig,
    precision: str,
    *,
    model_file: str = "model.onnx",
    chunk_bytes: int = CHUNK_BYTES,
) -> list[Path]:
    """Turn a finished export in ``directory`` (``model.onnx`` + ``model.onnx.data`` +
    ``genai_config.json`` + tokenizer files) of a checkpoint whose config is
    ``source_config`` into the transformers.js layout, in place.

    Meant for a directory not yet in its final place (the export's staging directory, see
    :func:`graphattn.exporters.output_dir.staged_directory`), so a failure half-way is never
    seen. Writes ``onnx/model{suffix}.onnx`` + its ``_data`` chunks, ``config.json`` and
    ``generation_config.json``; points ``genai_config.json`` at the new model file; keeps the
    tokenizer files. ``precision`` (``fp32``/``fp16``/``int4``/``int8``) picks the file name.
    Returns the files written, relative paths under ``directory``."""
    directory = Path(directory)
    name = model_file_name(precision)
    check_supported(cfg)
    source = directory / model_file
    model = onnx.load(str(source), load_external_data=False)
    check_supported(cfg, model)
    target_dir = directory / ONNX_DIR
    target_dir.mkdir(exist_ok=True)
    chunks = relocate_external_data(model, directory, target_dir, name, chunk_bytes)
    onnx.save(model, str(target_dir / name))
    source.unlink()
    written = [target_dir / name, *(target_dir / c for c in chunks)]

    files = {
        "config.json": hf_config(source_config, cfg, precision, len(chunks)),
        "generation_config.json": generation_config(cfg),
    }
    genai = directory / "genai_config.json"
    if genai.is_file():
        config = json.loads(genai.read_text())
        config["model"]["decoder"]["filename"] = f"{ONNX_DIR}/{name}"
        files["genai_config.json"] = config
    for filename, content in files.items():
        (directory / filename).write_text(json.dumps(content, indent=2) + "\n")
        written.append(directory / filename)
    return [p.relative_to(directory) for p in written]


__all__ = [
    "CHUNK_BYTES",
    "DTYPE_SUFFIXES",
    "PRECISION_DTYPES",
    "arrange",
    "check_supported",
    "chunk_names",
    "external_tensors",
    "generation_config",
    "hf_config",
    "model_file_name",
    "relocate_external_data",
]
