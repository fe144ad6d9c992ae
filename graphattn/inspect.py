"""Describe an export directory: architecture, I/O signature, op counts by domain, file sizes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from graphattn.compiler.blocks import explain as explain_lowering
from graphattn.compiler.moe import explain_moe
from graphattn.paged import KV_BLOCK_SIZE_KEY, KV_LAYOUT_KEY
from graphattn.runtime.cache_layout import CacheLayoutError, describe_layer, graph_layout
from graphattn.spec import KV_BUFFER_KEY, MIN_ORT_KEY


def _dims(value: onnx.ValueInfoProto) -> str:
    tensor = value.type.tensor_type
    dims = [d.dim_param or str(d.dim_value) for d in tensor.shape.dim]
    return f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}[{', '.join(dims)}]"


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024
    return ""


def _pattern(name: str) -> str:
    """``past_key_values.3.key`` → ``past_key_values.{i}.key``."""
    return ".".join("{i}" if p.isdigit() else p for p in name.split("."))


def _compact(names: list[str]) -> list[str]:
    """Collapse per-layer names (``past_key_values.0.key`` ...) into one line each (shown
    with the dims of the first layer that has it)."""
    lines, seen = [], set()
    for name in names:
        key = _pattern(name)
        if key not in seen:
            seen.add(key)
            lines.append(key)
    return lines


def _cache_lines(graph: onnx.GraphProto, where: str, metadata: dict[str, str]) -> list[str]:
    """``cache: N B/token (L layers)`` and, per run of layers caching the same tensors, their
    names, dims (batch, T for time) and bytes per token per row, read from the graph's
    ``past_key_values.{i}.<name>`` inputs; for a paged export, the pool's dims."""
    if metadata.get(KV_LAYOUT_KEY) == "paged":
        return _paged_cache_lines(graph, metadata)
    try:
        layout = graph_layout(graph, where=where)
    except CacheLayoutError as error:
        return [f"cache: unreadable ({error})"]
    if not layout:
        return []
    total = sum(t.bytes_per_token for tensors in layout for t in tensors)
    lines = [f"cache: {total} B/token per row ({len(layout)} layers)"]
    runs: list[tuple[int, int, str]] = []
    for index, tensors in enumerate(layout):
        text = describe_layer(tensors)
        if runs and runs[-1][2] == text:
            runs[-1] = (runs[-1][0], index, text)
        else:
            runs.append((index, index, text))
    for first, last, text in runs:
        which = f"layer {first}" if first == last else f"layers {first}-{last}"
        lines.append(f"  {which}: {text}")
    return lines


def _paged_cache_lines(graph: onnx.GraphProto, metadata: dict[str, str]) -> list[str]:
    """A paged export's pool: per layer ``key|value [num_blocks, kv_heads, block_size,
    head_dim]``, read through ``block_table``; bytes per cached token from those dims."""
    pools = [v for v in graph.input if v.name.startswith("past_key_values.")]
    total = 0
    for value in pools:
        tensor = value.type.tensor_type
        per_slot = int(np.prod([d.dim_value for d in tensor.shape.dim[1:]], dtype=np.int64))
        block = max(1, tensor.shape.dim[2].dim_value)
        total += per_slot // block * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
    layers = len({v.name.split(".")[1] for v in pools})
    first = ", ".join(f"{v.name.rsplit('.', 1)[1]} {_dims(v)}" for v in pools if ".0." in v.name)
    return [
        f"cache: paged pool, {metadata.get(KV_BLOCK_SIZE_KEY, '?')}-token blocks,"
        f" {total} B/token ({layers} layers)",
        f"  per layer: {first} (read through block_table; presents are the new tokens only)",
    ]


def describe(out_dir: str | Path, *, explain: bool = False) -> str:
    """A multi-line report of an export directory (the model's weights are not loaded);
    ``explain``: also the attention and mixture-of-experts lowering per layer (kernel, and why
    not the others)."""
    out_dir = Path(out_dir)
    model_path = out_dir / "model.onnx" if out_dir.is_dir() else out_dir
    if out_dir.is_dir() and not model_path.is_file():
        found = sorted((out_dir / "onnx").glob("model*.onnx"))  # transformers.js layout
        model_path = found[0] if found else model_path
    if not model_path.is_file():
        raise FileNotFoundError(f"{out_dir}: no model.onnx")
    model = onnx.load(str(model_path), load_external_data=False)
    lines = []
    config_path = model_path.parent / "genai_config.json"
    if config_path.is_file():
        decoder_cfg = json.loads(config_path.read_text())["model"]
        d = decoder_cfg["decoder"]
        latent = "graphattn.cache_inputs" in json.loads(config_path.read_text())
        heads = "" if latent else f" kv_heads={d['num_key_value_heads']} head_dim={d['head_size']}"
        lines.append(
            f"architecture: {decoder_cfg['type']}  layers={d['num_hidden_layers']}"
            f" hidden={d['hidden_size']} heads={d['num_attention_heads']}{heads}"
            f" vocab={decoder_cfg['vocab_size']} context={decoder_cfg['context_length']}"
        )
    metadata = {p.key: p.value for p in model.metadata_props}
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)
    extras = "".join(
        f"  {label}={metadata[key]}"
        for label, key in (
            ("dtype", "graphattn.dtype"),
            ("target", "graphattn.target"),
            ("precision", "graphattn.precision"),
            ("kv_buffer", KV_BUFFER_KEY),
            ("kv_layout", KV_LAYOUT_KEY),
            ("min_onnxruntime", MIN_ORT_KEY),
            ("weights", "graphattn.weights"),
        )
        if key in metadata
    )
    lines.append(
        f"producer: {model.producer_name} {model.producer_version}  ir={model.ir_version}"
        f"  opsets={opsets}{extras}"
    )
    by_name_in = {v.name: v for v in model.graph.input}
    by_name_out = {v.name: v for v in model.graph.output}
    lines.append("inputs:")
    for key in _compact(list(by_name_in)):
        sample = next(v for n, v in by_name_in.items() if _pattern(n) == key)
        lines.append(f"  {key}: {_dims(sample)}")
    lines.append("outputs:")
    for key in _compact(list(by_name_out)):
        sample = next(v for n, v in by_name_out.items() if _pattern(n) == key)
        lines.append(f"  {key}: {_dims(sample)}")
    lines.extend(_cache_lines(model.graph, str(model_path), metadata))
    counts = Counter(node.domain or "ai.onnx" for node in model.graph.node)
    lines.append(
        f"graph nodes: {sum(counts.values())} ("
        + ", ".join(f"{domain}: {n}" for domain, n in sorted(counts.items()))
        + ")"
    )
    if model.functions:
        inner = Counter(n.domain or "ai.onnx" for f in model.functions for n in f.node)
        lines.append(
            f"local functions: {len(model.functions)} ("
            + ", ".join(f"{f.domain}.{f.name}" for f in model.functions)
            + ")"
        )
        lines.append(
            "function body nodes: " + ", ".join(f"{d}: {n}" for d, n in sorted(inner.items()))
        )
    parameters = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    lines.append(f"initializers: {len(model.graph.initializer)} ({parameters:,} values)")
    if explain:
        lines.extend(explain_lowering(metadata))
        lines.extend(explain_moe(metadata))
    lines.append("files:")
    for path in sorted(model_path.parent.iterdir()):
        if path.is_file():
            lines.append(f"  {path.name}: {_size(path.stat().st_size)}")
    return "\n".join(lines)
