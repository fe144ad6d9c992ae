"""What the runtime needs to know about an exported decoder, from ``genai_config.json`` (or,
for a bare ``.onnx`` with no config beside it, from the graph's own inputs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ModelLoadError(ValueError):
    """The export directory or model file is missing, unreadable, or inconsistent."""


@dataclass(frozen=True)
class DecoderConfig:
    """Names and sizes of one decoder graph's I/O."""

    model_path: Path
    num_layers: int
    kv_heads: int  # 0 where unknown or meaningless (a latent cache without genai_config)
    head_dim: int
    vocab_size: int | None
    context_length: int | None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int = 0
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    model_type: str = ""
    share_buffer: bool = False  # past and present may be one buffer (GroupQueryAttention)
    extra: dict = field(default_factory=dict)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def locate_model(path: str | Path) -> tuple[Path, Path | None]:
    """(model.onnx, genai_config.json or None) for an export directory or a bare .onnx file."""
    path = Path(path)
    if path.is_dir():
        model = path / "model.onnx"
        config = path / "genai_config.json"
        if config.is_file():
            try:
                filename = json.loads(config.read_text())["model"]["decoder"]["filename"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ModelLoadError(f"{config}: not a valid genai_config.json ({error})") from None
            model = path / filename
        if not model.is_file():
            raise ModelLoadError(f"{path}: no model ({model.name} not found)")
        return model, config if config.is_file() else None
    if path.is_file() and path.suffix == ".onnx":
        config = path.parent / "genai_config.json"
        return path, config if config.is_file() else None
    raise ModelLoadError(f"{path}: no such export directory or .onnx file")


def from_genai_config(model: Path, config_path: Path) -> DecoderConfig:
    """Parse ONNX Runtime GenAI's config format."""
    try:
        data = json.loads(config_path.read_text())
        m, d = data["model"], data["model"]["decoder"]
        inputs, outputs = d.get("inputs", {}), d.get("outputs", {})
        eos = _ids(m.get("eos_token_id"))
        pad = m.get("pad_token_id")
        return DecoderConfig(
            model_path=model,
            num_layers=int(d["num_hidden_layers"]),
            kv_heads=int(d["num_key_value_heads"]),
            head_dim=int(d["head_size"]),
            vocab_size=int(m["vocab_size"]) if m.get("vocab_size") else None,
            context_length=int(m["context_length"]) if m.get("context_length") else None,
            eos_token_ids=eos,
            bos_token_id=m.get("bos_token_id"),
            pad_token_id=int(pad if pad is not None else (eos[0] if eos else 0)),
            past_key=inputs.get("past_key_names", "past_key_values.%d.key"),
            past_value=inputs.get("past_value_names", "past_key_values.%d.value"),
            present_key=outputs.get("present_key_names", "present.%d.key"),
            present_value=outputs.get("present_value_names", "present.%d.value"),
            model_type=str(m.get("type", "")),
            share_buffer=bool(data.get("search", {}).get("past_present_share_buffer", False)),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{config_path}: not a valid genai_config.json ({error!r})") from None


def from_session_io(model: Path, inputs: list, outputs: list) -> DecoderConfig:
    """Infer the config from a session's I/O when no genai_config.json is present: layers
    from the ``past_key_values.{i}.*`` inputs; ``kv_heads``/``head_dim`` from layer 0's
    ``key [batch, kv_heads, past, head_dim]`` where it has one, else 0 (a latent cache)."""
    layers = {
        int(i.name.split(".")[1])
        for i in inputs
        if i.name.startswith("past_key_values.") and i.name.split(".")[1].isdigit()
    }
    if not layers:
        raise ModelLoadError(f"{model}: no genai_config.json and no past_key_values inputs")
    key = next((i for i in inputs if i.name == "past_key_values.0.key"), None)
    kv_heads = head_dim = 0
    if key is not None and len(key.shape) == 4:
        kv_heads, head_dim = (d if isinstance(d, int) else 0 for d in (key.shape[1], key.shape[3]))
    logits = next((o for o in outputs if o.name == "logits"), None)
    vocab = logits.shape[-1] if logits is not None and isinstance(logits.shape[-1], int) else None
    return DecoderConfig(model, max(layers) + 1, kv_heads, head_dim, vocab, None)


def numpy_dtype(onnx_type: str) -> type:
    """np.float16 / np.float32 for an onnxruntime type string like ``tensor(float16)``."""
    return np.float16 if "float16" in onnx_type else np.float32
