"""The ``graphattn`` section of a ``config.json``: sparse attention per layer.

A Llama-shaped checkpoint trained with native sparse attention (NSA) or sparse routed
attention says so in its ``config.json``::

    "graphattn": {
      "version": 1,
      "layer_attention": ["native_sparse", "full_attention", "sparse_routed",
                          {"kind": "native_sparse", "top_blocks": 8, "gates": "token"}],
      "native_sparse": {"block_size": 64, "top_blocks": 16, "top_tokens": 256, "window": 512,
                        "selection": "head", "gates": "head"},
      "sparse_routed": {"segment_size": 64, "top_k": 16, "selection": "head"}
    }

- ``version``: 1 (optional).
- ``layer_attention``: one entry per layer (``num_hidden_layers`` of them): ``full_attention``
  (the family's ordinary layer, sliding window included), ``native_sparse`` or
  ``sparse_routed``, or an object ``{"kind": ..., <parameter>: ...}`` overriding the shared
  parameters of its kind for that layer.
- ``native_sparse``: ``block_size`` (B), ``top_blocks`` (c), ``top_tokens`` (f), ``window`` (W),
  ints >= 1, required when a layer is ``native_sparse``; ``selection`` ``head`` (default) or
  ``group`` (the query heads of a KV head share the choices); ``gates`` ``head`` (default: the
  learned logits ``gate_coarse``, ``gate_fine``, ``gate_window [num_attention_heads]``) or
  ``token`` (a projection ``gate_proj.weight [3·num_attention_heads, hidden_size]``, rows
  coarse | fine | window, and an optional ``gate_proj.bias``).
- ``sparse_routed``: ``segment_size``, ``top_k`` (ints >= 1); ``selection`` as above. Routed
  layers need RoPE; the graph's KV cache then holds their keys before RoPE.

Unknown keys, kinds and versions are refused by name (``ValueError``, one line). The gate
tensors are read from the checkpoint (``{prefix}.{i}.self_attn.gate_coarse`` ...,
:func:`gate_weights`); a missing one is refused, never defaulted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from graphattn.models.common import FULL, linear, plain
from graphattn.spec import (
    SPARSE_GATES,
    SPARSE_KINDS,
    SPARSE_SELECTIONS,
    LayerSpec,
    ModelConfig,
    SparseSpec,
    WeightSource,
)

SECTION = "graphattn"
# Architectures (graphattn.spec.Architecture.name) whose config_from_hf reads the section;
# models.architecture_for refuses it for any other (it would otherwise be ignored).
FAMILIES = ("llama",)
VERSIONS = (1,)
SECTION_KEYS = ("version", "layer_attention", *SPARSE_KINDS)
# config key → SparseSpec field, per kind
PARAMETERS = {
    "native_sparse": {
        "block_size": "block_size",
        "top_blocks": "top_blocks",
        "top_tokens": "top_tokens",
        "window": "window",
        "selection": "selection",
        "gates": "gates",
    },
    "sparse_routed": {
        "segment_size": "block_size",
        "top_k": "top_blocks",
        "selection": "selection",
    },
}
CHOICES = {"selection": SPARSE_SELECTIONS, "gates": SPARSE_GATES}
REQUIRED = {
    "native_sparse": ("block_size", "top_blocks", "top_tokens", "window"),
    "sparse_routed": ("segment_size", "top_k"),
}
# checkpoint module names of the gate tensors (under {prefix}.{i}.{attention}.)
HEAD_GATE_NAMES = {
    "gate_coarse": "gate_coarse",
    "gate_fine": "gate_fine",
    "gate_window": "gate_window",
}
TOKEN_GATE = "gate_proj"


def _where(*path: object) -> str:
    return f"config.json {SECTION}" + "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" for p in path
    )


def _unknown(where: str, keys: Sequence[str], known: Sequence[str]) -> None:
    extra = [k for k in keys if k not in known]
    if extra:
        raise ValueError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(known)})")


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object, got {value!r}")
    return value


def _parameter(kind: str, key: str, value: object, where: str) -> object:
    if key in CHOICES:
        if value not in CHOICES[key]:
            raise ValueError(
                f"{where}.{key} must be one of {', '.join(CHOICES[key])}, got {value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}.{key} must be an int >= 1, got {value!r}")
    return value


def _parameters(kind: str, given: Mapping[str, object], where: str) -> dict[str, object]:
    known = PARAMETERS[kind]
    _unknown(where, list(given), list(known))
    return {key: _parameter(kind, key, value, where) for key, value in given.items()}


def sparse_layers(config: Mapping[str, object], num_layers: int) -> tuple[SparseSpec | None, ...]:
    """Per layer, its :class:`SparseSpec` or None (``full_attention``), from ``config``'s
    ``graphattn`` section (module docstring); all None without the section."""
    section = config.get(SECTION)
    if section is None:
        return (None,) * num_layers
    section = _object(section, _where())
    _unknown(_where(), list(section), SECTION_KEYS)
    version = section.get("version", 1)
    if version not in VERSIONS or isinstance(version, bool):
        raise ValueError(f"{_where('version')} must be one of {VERSIONS}, got {version!r}")
    shared = {
        kind: _parameters(kind, _object(section[kind], _where(kind)), _where(kind))
        for kind in SPARSE_KINDS
        if kind in section
    }
    entries = section.get("layer_attention")
    if not isinstance(entries, list):
        raise ValueError(
            f"{_where('layer_attention')} must be a list of {num_layers} entries (one per"
            f" layer), got {entries!r}"
        )
    if len(entries) != num_layers:
        raise ValueError(
            f"{_where('layer_attention')} has {len(entries)} entries, num_hidden_layers is"
            f" {num_layers}"
        )
    kinds = (FULL, *SPARSE_KINDS)
    specs: list[SparseSpec | None] = []
    for i, entry in enumerate(entries):
        where = _where("layer_attention", i)
        overrides: Mapping[str, object] = {}
        if isinstance(entry, Mapping):
            if "kind" not in entry:
                raise ValueError(f"{where} must name its kind ({', '.join(kinds)})")
            kind = entry["kind"]
            overrides = {k: v for k, v in entry.items() if k != "kind"}
        else:
            kind = entry
        if kind not in kinds:
            raise ValueError(
                f"{where}: unknown attention kind {kind!r} (known: {', '.join(kinds)})"
            )
        if kind == FULL:
            _unknown(where, list(overrides), [])
            specs.append(None)
            continue
        given = {**shared.get(kind, {}), **_parameters(kind, overrides, where)}
        missing = [k for k in REQUIRED[kind] if k not in given]
        if missing:
            raise ValueError(f"{where}: {kind} needs {', '.join(missing)} ({_where(kind)})")
        fields = {PARAMETERS[kind][k]: v for k, v in given.items()}
        try:
            specs.append(SparseSpec(kind=kind, **fields))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return tuple(specs)


def with_sparse_layers(
    config: Mapping[str, object], layers: Sequence[LayerSpec]
) -> list[LayerSpec]:
    """``layers`` with the attention of each sparse layer (per :func:`sparse_layers`) made
    sparse; ValueError naming the layer when its attention cannot be (a sliding window,
    routed without RoPE, ...)."""
    specs = sparse_layers(config, len(layers))
    out = []
    for i, (layer, sparse) in enumerate(zip(layers, specs)):
        if sparse is not None:
            try:
                attention = dataclasses.replace(layer.attention, sparse=sparse)
            except ValueError as error:
                raise ValueError(f"{_where('layer_attention', i)}: {error}") from None
            layer = dataclasses.replace(layer, attention=attention)
        out.append(layer)
    return out


def gate_weights(
    plan: dict[str, WeightSource],
    cfg: ModelConfig,
    i: int,
    *,
    prefix: str = "model.layers",
    attention: str = "self_attn",
) -> None:
    """Layer ``i``'s gate roles when it is ``native_sparse``: ``layers.{i}.gate_coarse`` ...
    ``[num_heads]`` from ``{prefix}.{i}.{attention}.gate_coarse`` ... (gates ``head``), or
    ``layers.{i}.gate.weight [hidden, 3·num_heads]`` from ``...gate_proj.weight`` (transposed;
    ``gate.bias`` from ``gate_proj.bias`` when the checkpoint has it; gates ``token``)."""
    a = cfg.layers[i].attention
    if a.sparse is None or a.sparse.kind != "native_sparse":
        return
    p, role = f"{prefix}.{i}.{attention}", f"layers.{i}"
    if a.sparse.gates == "head":
        for gate, module in HEAD_GATE_NAMES.items():
            plan[f"{role}.{gate}"] = plain(f"{p}.{module}", (a.num_heads,))
        return
    width = 3 * a.num_heads
    plan[f"{role}.gate.weight"] = linear(f"{p}.{TOKEN_GATE}.weight", width, cfg.hidden_size)
    plan[f"{role}.gate.bias"] = plain(f"{p}.{TOKEN_GATE}.bias", (width,), optional=True)


def refuse_unread(config: Mapping[str, object], architecture: str) -> None:
    """ValueError when ``config`` has the section and ``architecture`` does not read it."""
    if SECTION in config and architecture not in FAMILIES:
        raise ValueError(
            f"config.json {SECTION}: sparse attention layers are read for model types built as"
            f" {', '.join(FAMILIES)} (Llama, Mistral, Qwen2), not {config.get('model_type')!r}"
        )


__all__ = ["gate_weights", "refuse_unread", "sparse_layers", "with_sparse_layers"]
