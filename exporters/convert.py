"""``graphattn convert``: write what we read (a GGUF, a known model, an HF directory) in the
Hugging Face layout: config.json, model.safetensors (float32), tokenizer files.

The safetensors file is streamed tensor by tensor, so memory stays near one tensor.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np

from graphattn.exporters.output_dir import staged_directory


def write_safetensors_streaming(path: Path, names: list[str], shapes: dict, load) -> None:
    """A float32 safetensors file whose tensors come one at a time from ``load(name)``."""
    header, offset = {}, 0
    for name in names:
        size = int(np.prod(shapes[name], dtype=np.int64)) * 4
        header[name] = {
            "dtype": "F32",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name in names:
            array = np.ascontiguousarray(load(name), dtype=np.float32)
            if tuple(array.shape) != tuple(shapes[name]):
                raise ValueError(
                    f"tensor {name!r} loaded as {array.shape}, expected {shapes[name]}"
                )
            file.write(array.tobytes())


def convert(
    checkpoint: str | Path, out_dir: str | Path, *, notes: list[str] | None = None
) -> list[Path]:
    """Write the HF layout of ``checkpoint`` into ``out_dir``; returns the written paths.

    A tokenizer of a kind we cannot build is left out with a one-line warning: appended to
    ``notes`` when given, else issued with :func:`warnings.warn`."""
    from graphattn.exporters.export import open_source, write_tokenizer_or_warn

    source = open_source(checkpoint)
    names = sorted(source.tensors)
    shapes = {name: source.tensors[name].shape for name in names}
    with staged_directory(out_dir, markers=("config.json",)) as staging:
        (staging / "config.json").write_text(json.dumps(source.config, indent=2) + "\n")
        write_safetensors_streaming(staging / "model.safetensors", names, shapes, source.load)
        tokenizer_files, messages = write_tokenizer_or_warn(source, staging)
        written = ["config.json", "model.safetensors", *tokenizer_files]
    for message in messages:
        if notes is not None:
            notes.append(message)
        else:
            warnings.warn(message, stacklevel=2)
    return [Path(out_dir).absolute() / name for name in written]
