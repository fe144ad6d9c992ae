"""Open a Hugging Face checkpoint directory: ``config.json`` plus ``model.safetensors`` or a
sharded ``model.safetensors.index.json``. Pickle checkpoints (``.bin``, ``.pt``, ``.pth``,
``.ckpt``) are refused and never unpickled."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphattn.exporters.safetensors_reader import (
    CheckpointError,
    TensorEntry,
    load_float32,
    read_header,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class Checkpoint:
    """An HF directory: its parsed ``config.json`` and every tensor entry, by name."""

    directory: Path
    config: dict
    tensors: dict[str, TensorEntry]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data on disk."""
        return sum(entry.nbytes for entry in self.tensors.values())

    def load(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32, read now (memory-mapped, released afterwards)."""
        return load_float32(self.tensors[name])

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """Copy the tokenizer files present into ``out_dir``; returns their names."""
        return copy_present(self.directory, out_dir, TOKENIZER_FILES)


def pickle_refused(path: Path) -> CheckpointError:
    """The error for a pickle checkpoint, which is never opened."""
    return CheckpointError(
        f"{path}: pickle checkpoints are refused (never unpickled); convert it to safetensors first"
    )


def copy_present(source_dir: Path, out_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Copy those of ``names`` that exist in ``source_dir`` into ``out_dir``; returns them."""
    copied = []
    for name in names:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: bad UTF-8, JSONDecodeError, ints past Python's 4300-digit limit;
    # RecursionError: brackets nested deeper than the decoder recurses
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: cannot read JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Parse config and safetensors headers (no tensor data is read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected an HF checkpoint folder)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    config = _read_json(config_path)
    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        tensors = _read_sharded(directory, index_path)
    elif single.is_file():
        tensors = read_header(single)
    else:
        shards = sorted(directory.glob("*.safetensors"))
        if shards:
            tensors = {}
            for shard in shards:
                tensors.update(read_header(shard))
        else:
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise pickle_refused(directory / pickles[0])
            raise CheckpointError(f"{directory}: no model.safetensors or index found")
    return Checkpoint(directory, config, tensors)


def _read_sharded(directory: Path, index_path: Path) -> dict[str, TensorEntry]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no weight_map object")
    headers: dict[str, dict[str, TensorEntry]] = {}
    tensors = {}
    for name, shard in sorted(weight_map.items()):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index_path}: weight_map[{name!r}] must name a shard file in the checkpoint"
                f" directory, got {shard!r}"
            )
        if shard not in headers:
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: shard {shard!r} for {name!r} is missing")
            headers[shard] = read_header(shard_path)
        if name not in headers[shard]:
            raise CheckpointError(
                f"{directory / shard}: tensor {name!r} listed in the index is absent"
            )
        tensors[name] = headers[shard][name]
    return tensors
