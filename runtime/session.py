"""Open an exported decoder in onnxruntime: choose the provider, set threads and graph
optimization, and check the graph's I/O against its config before anything runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphattn.runtime.cache_layout import CacheLayoutError, LayerCache, read_layout
from graphattn.runtime.config import (
    DecoderConfig,
    ModelLoadError,
    from_genai_config,
    from_session_io,
    locate_model,
)
from graphattn.runtime.model_metadata import read_metadata, version_tuple

PROVIDERS = ("auto", "cpu", "cuda")
_OPTIMIZATION = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cuda_available() -> bool:
    """True when this onnxruntime build has the CUDA execution provider."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _providers(provider: str) -> list[str]:
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cuda" and not cuda_available():
        raise ModelLoadError(
            "provider 'cuda' requested but this onnxruntime has no CUDAExecutionProvider"
            " (install the cuda extra: onnxruntime-gpu)"
        )
    if provider == "cuda" or (provider == "auto" and cuda_available()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


CONTEXT_KEY = "graphattn.context_length"  # model metadata: positions the graph supports
KV_BUFFER_KEY = "graphattn.kv_buffer"  # model metadata: "shared" when past/present may alias
MIN_ORT_KEY = "graphattn.min_onnxruntime"  # model metadata: oldest onnxruntime that runs it
# model metadata: "one_token" when a batch continuing after a past takes one token per call
CONTINUATION_KEY = "graphattn.batched_continuation"
KV_LAYOUT_KEY = "graphattn.kv_layout"  # model metadata: "paged" for a block-table pool cache
KV_BLOCK_SIZE_KEY = "graphattn.kv_block_size"  # model metadata: slots per pool block


def check_onnxruntime(model_path: Path, installed: str = ort.__version__) -> None:
    """Refuse (ModelLoadError, one line) a model whose metadata asks for a newer onnxruntime
    than ``installed``; say how to get one that loads. Read before onnxruntime loads it."""
    try:
        needed = read_metadata(model_path).get(MIN_ORT_KEY)
    except (OSError, ValueError):
        return  # not readable as a model: onnxruntime's own load error says more
    if needed and version_tuple(installed) < version_tuple(needed):
        raise ModelLoadError(
            f"{model_path}: needs onnxruntime >= {needed}, but {installed} is installed"
            f" (upgrade onnxruntime, or re-export for it with --ort-version"
            f" {_major_minor(installed)})"
        )


def _major_minor(version: str) -> str:
    """``"1.30.0"`` → ``"1.30"``, the spelling ``--ort-version`` takes."""
    return ".".join(str(part) for part in version_tuple(version)[:2])


def _load_error(model_path: Path, error: Exception) -> str:
    """One line for an onnxruntime load failure, with the likely cause where we know it: a
    graph lowered for a newer onnxruntime (exports older than graphattn.min_onnxruntime)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if "GroupQueryAttention" in text and "not in range" in text:
        return (
            f"{model_path}: onnxruntime {ort.__version__} cannot load its GroupQueryAttention"
            " (lowered for a newer onnxruntime: re-export with --ort-version"
            f" {_major_minor(ort.__version__)})"
        )
    if len(first) > 300:
        first = first[:300] + "…"
    return f"{model_path}: onnxruntime cannot load it ({first})"


class ModelSession:
    """An onnxruntime session over one exported decoder plus its :class:`DecoderConfig`.

    ``device`` is ``"cuda"`` when the CUDA provider actually loaded, else ``"cpu"``.
    ``shares_kv_buffer``: the graph's attention can append into its past buffer in place
    (``past_present_share_buffer`` in genai_config.json, or our model metadata), and does
    so on this device (not an fp32 graph under CUDA). ``one_token_continuation``: a batch of
    several rows continuing after a past must be fed one token per call (the caches do so).
    ``last_logits_only``: the graph's logits are ``[batch_size, 1, vocab]``.
    An export whose metadata needs a newer onnxruntime than the installed one is refused
    before onnxruntime loads it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        provider: str = "auto",
        threads: int | None = None,
        optimization: str = "all",
    ) -> None:
        model_path, config_path = locate_model(path)
        # where the export's other files (tokenizer) are: genai_config.json's directory, which
        # in the transformers.js layout is the parent of onnx/model.onnx
        self.export_dir = (config_path or model_path).parent
        check_onnxruntime(model_path)
        options = ort.SessionOptions()
        if optimization not in _OPTIMIZATION:
            raise ValueError(f"optimization must be one of {', '.join(_OPTIMIZATION)}")
        options.graph_optimization_level = _OPTIMIZATION[optimization]
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=_providers(provider)
            )
        except Exception as error:  # onnxruntime's own exception types (Fail, InvalidGraph…)
            if not isinstance(error, RuntimeError) and not type(error).__module__.startswith(
                "onnxruntime"
            ):
                raise
            raise ModelLoadError(_load_error(model_path, error)) from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.config: DecoderConfig = (
            from_genai_config(model_path, config_path)
            if config_path is not None
            else from_session_io(model_path, inputs, outputs)
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        if self.config.context_length is None and CONTEXT_KEY in metadata:
            # a bare .onnx of ours: its RoPE tables (GroupQueryAttention) end at this length
            context = int(metadata[CONTEXT_KEY])
            self.config = dataclasses.replace(self.config, context_length=context)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in outputs]
        # "paged": the cache inputs are pools [num_blocks, Hkv, kv_block_size, D] read through
        # block_table, with past_lengths/query_lengths instead of attention_mask (the engine)
        self.kv_layout = metadata.get(KV_LAYOUT_KEY, "contiguous")
        self.kv_block_size = int(metadata.get(KV_BLOCK_SIZE_KEY, 0) or 0)
        self._check_io(inputs, outputs)
        self.kv_dtype = self.cache_layout[0][0].dtype
        self.has_position_ids = "position_ids" in self.input_names
        # packed sequences (export option segment_ids): document id per slot, 0 = pad
        self.has_segment_ids = "segment_ids" in self.input_names
        logits_length = next(o for o in outputs if o.name == "logits").shape[1]
        self.last_logits_only = logits_length == 1
        # GroupQueryAttention lowered without query_seqlens (onnxruntime < 1.32): several rows
        # cannot continue with several tokens after a past in one call
        self.one_token_continuation = metadata.get(CONTINUATION_KEY) == "one_token"
        declared = self.config.share_buffer or metadata.get(KV_BUFFER_KEY) == "shared"
        # onnxruntime's CUDA GroupQueryAttention takes fp16/bf16 only: an fp32 graph runs that
        # node on the CPU provider, through copies that cannot append in place
        # only GroupQueryAttention appends in place, over ordinary [B, Hkv, T, D] key/value
        ordinary = all(t.is_kv for layer in self.cache_layout for t in layer)
        self.shares_kv_buffer = (
            declared and ordinary and (self.device == "cpu" or self.kv_dtype != np.float32)
        )

    def past_names(self, layer: int) -> tuple[str, ...]:
        """Cache input names of ``layer`` in graph order (past key, past value for ordinary
        attention; past latent, past rope key for latent attention)."""
        return tuple(t.past for t in self.cache_layout[layer])

    def present_names(self, layer: int) -> tuple[str, ...]:
        """Cache output names of ``layer``, in the order of :meth:`past_names`."""
        return tuple(t.present for t in self.cache_layout[layer])

    @property
    def cache_bytes_per_token(self) -> int:
        """Cache bytes per token per row, all layers together."""
        return sum(t.bytes_per_token for layer in self.cache_layout for t in layer)

    def _check_io(self, inputs: list, outputs: list) -> None:
        """Reads ``self.cache_layout`` (per layer, its :class:`CacheTensor` s) from the graph
        and checks it and the other I/O against the config."""
        cfg, where = self.config, self.config.model_path
        by_input = {i.name: i for i in inputs}
        by_output = {o.name: o for o in outputs}
        needed = ("input_ids", "attention_mask")
        if self.kv_layout == "paged":
            needed = ("input_ids", "position_ids", "block_table", "past_lengths", "query_lengths")
        for name in needed:
            if name not in by_input:
                raise ModelLoadError(f"{where}: graph has no {name!r} input")
        if "logits" not in by_output:
            raise ModelLoadError(f"{where}: graph has no 'logits' output")
        try:
            layout: list[LayerCache] = read_layout(
                inputs,
                outputs,
                where=str(where),
                key_names=(cfg.past_key, cfg.past_value),
                present_names=(cfg.present_key, cfg.present_value),
                head_dims=(cfg.kv_heads, cfg.head_dim) if cfg.kv_heads else None,
            )
        except CacheLayoutError as error:
            raise ModelLoadError(str(error)) from None
        if not layout:
            raise ModelLoadError(f"{where}: graph has no cache inputs ({cfg.past_key % 0!r} ...)")
        ordinary = layout[0][0].name == "key"
        if len(layout) < cfg.num_layers:
            layer = len(layout)
            missing = cfg.past_key % layer if ordinary else f"past_key_values.{layer}.*"
            raise ModelLoadError(
                f"{where}: input {missing!r} is missing but the config says"
                f" num_hidden_layers={cfg.num_layers}"
            )
        if len(layout) > cfg.num_layers:
            extra = layout[cfg.num_layers][0].past
            raise ModelLoadError(
                f"{where}: graph has input {extra!r} beyond num_hidden_layers={cfg.num_layers}"
            )
        for tensors in layout:
            for tensor in tensors:
                if not tensor.is_kv or not cfg.kv_heads:
                    continue
                shape = by_input[tensor.past].shape
                expected = {1: cfg.kv_heads, 3: cfg.head_dim}  # symbolic dims are accepted
                if any(isinstance(shape[i], int) and shape[i] != v for i, v in expected.items()):
                    raise ModelLoadError(
                        f"{where}: input {tensor.past!r} has shape {shape}, config says"
                        f" [batch, {cfg.kv_heads}, past, {cfg.head_dim}]"
                    )
        self.cache_layout = layout
        vocab = by_output["logits"].shape[-1]
        if cfg.vocab_size and isinstance(vocab, int) and vocab != cfg.vocab_size:
            raise ModelLoadError(
                f"{where}: logits width {vocab} != config vocab_size {cfg.vocab_size}"
            )
