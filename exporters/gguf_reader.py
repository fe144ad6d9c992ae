"""Open a GGUF file as a checkpoint: the family's metadata → an HF-style ``config.json`` dict,
GGUF tensor names → HF names (both declared in the family's file in ``graphattn.models``, as a
:class:`~graphattn.spec.GGUFSpec`), tensors dequantized to float32 one at a time
(memory-mapped), and the Q/K row permutation that GGUF converters apply for RoPE undone.

The file is parsed by :mod:`graphattn.exporters.gguf_format`; the optional ``gguf`` package
(``pip install graphattn[gguf]``) is needed only for tensor types not decoded here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphattn.exporters.gguf_dequant import dequantize, q4_parts, q8_0_parts
from graphattn.exporters.gguf_format import GGUFFormatError, read_gguf
from graphattn.exporters.gguf_tokenizer import UnsupportedTokenizerError, write_tokenizer_files
from graphattn.exporters.safetensors_reader import CheckpointError
from graphattn.models import gguf_spec_for
from graphattn.spec import GGUFSpec

_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
LOSSLESS_KINDS = ("Q8_0", "Q4_0", "Q4_1")


def hf_name(spec: GGUFSpec, gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor under the family's naming (``spec``), or None."""
    if gguf_name in spec.tensor_names:
        return spec.tensor_names[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in spec.layer_names:
        return f"{spec.layer_prefix}.{match.group(1)}.{spec.layer_names[match.group(2)]}"
    return None


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo the converter's RoPE permutation of q/k rows ``[heads * head_dim, ...]``.

    The converter regroups each head's rows from split halves (HF) to interleaved pairs:
    GGUF row ``2i + j`` of a head is HF row ``j * head_dim / 2 + i``.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    grouped = weight.reshape(heads, half, 2, *weight.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(weight.shape))


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its GGUF name and type, HF shape [rows, row_length], and where it lives."""

    path: Path
    gguf_name: str
    kind: str
    shape: tuple[int, ...]
    nbytes: int
    index: int


class GGUFCheckpoint:
    """A GGUF file with the interface of an HF checkpoint (config, tensors, load, tokenizer)."""

    def __init__(self, path: str | Path) -> None:
        self.directory = self.path = Path(path)
        try:
            self._file = read_gguf(self.path)
        except (GGUFFormatError, OSError) as error:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({error})") from None
        self.fields = self._file.fields
        arch = self.fields.get("general.architecture")
        try:
            self.spec = gguf_spec_for(arch)
        except ValueError as error:
            raise CheckpointError(f"{self.path}: {error}") from None
        try:
            self.config = self.spec.config(self.fields, self._need)
        except ValueError as error:
            raise CheckpointError(f"{self.path}: {error}") from None
        except (TypeError, OverflowError, ZeroDivisionError) as error:
            raise CheckpointError(
                f"{self.path}: GGUF metadata of {arch} has a value of the wrong type or size"
                f" ({error})"
            ) from None
        self.tensors: dict[str, GGUFTensor] = {}
        for index, info in enumerate(self._file.tensors):
            name = hf_name(self.spec, info.name)
            if name is None:
                if info.name == "rope_freqs.weight":
                    raise CheckpointError(
                        f"{self.path}: rope_freqs (Llama-3 RoPE) is not supported"
                    )
                raise CheckpointError(f"{self.path}: unexpected GGUF tensor {info.name!r}")
            self.tensors[name] = GGUFTensor(
                self.path, info.name, info.kind, info.shape, info.nbytes, index
            )
        self.config["tie_word_embeddings"] = "lm_head.weight" not in self.tensors

    def _need(self, key: str):
        """A required metadata value; the one-line error names the key and the file."""
        if key not in self.fields:
            raise CheckpointError(f"{self.path}: GGUF metadata {key!r} is missing")
        return self.fields[key]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file."""
        return sum(t.nbytes for t in self.tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes/values of tensor ``name`` (memory-mapped), rows first."""
        tensor = self.tensors[name]
        if tensor.nbytes == 0:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.gguf_name!r}: tensor type {tensor.kind} is not"
                " supported (install the gguf extra for more types)"
            )
        return self._file.array(self._file.tensors[tensor.index])

    def load(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 with HF layout (q/k rows un-permuted)."""
        tensor = self.tensors[name]
        try:
            array = dequantize(self.raw(name), tensor.kind, tensor.shape)
        except ValueError as error:
            raise CheckpointError(f"{self.path}: tensor {tensor.gguf_name!r}: {error}") from None
        heads = self.permuted_heads(name)
        if heads is None:
            return array
        if heads < 1 or array.shape[0] % (2 * heads):
            raise CheckpointError(
                f"{self.path}: tensor {tensor.gguf_name!r}: {array.shape[0]} rows do not split"
                f" into {heads} heads of RoPE pairs (head counts in the metadata are wrong)"
            )
        return unpermute_rows(array, heads)

    def permuted_heads(self, name: str) -> int | None:
        """Head count whose RoPE permutation applies to ``name``'s rows, or None."""
        for suffix, heads_key in self.spec.permuted_rows.items():
            if name.endswith(suffix):
                return int(self.config[heads_key])
        return None

    def block_quantized_kind(self, name: str) -> str | None:
        """The block format of ``name`` if it maps losslessly onto MatMulNBits, else None."""
        tensor = self.tensors.get(name)
        if tensor is None or len(tensor.shape) != 2 or tensor.kind not in LOSSLESS_KINDS:
            return None
        return tensor.kind

    def block_quantized(self, name: str):
        """``name``'s GGUF blocks as a :class:`BlockQuantized` (rows = output features), exact.

        Q8_0 → 8 bits, zero point 128; Q4_0 → 4 bits, zero point 8; Q4_1 (``d·q + m``) → 4 bits,
        zero point 0 and per-block offsets ``m``. Q/K rows are un-permuted like the float path."""
        from graphattn.compiler.blockquant import BlockQuantized

        tensor, raw = self.tensors[name], self.raw(name)
        if tensor.kind == "Q8_0":
            scales, q = q8_0_parts(raw)
            levels = (q.astype(np.int16) + 128).astype(np.uint8)
            zero = np.full(scales.shape, 128, dtype=np.uint8)
            bits, mins = 8, None
        else:
            scales, levels, mins = q4_parts(raw, tensor.kind)
            bits = 4
            # Q4_0: d·(q − 8). Q4_1: d·q + m, kept as zero point 0 plus a per-block offset m
            zero = np.full(scales.shape, 0 if mins is not None else 8, dtype=np.uint8)
        heads = self.permuted_heads(name)
        if heads is not None:
            levels, scales, zero = (unpermute_rows(a, heads) for a in (levels, scales, zero))
            mins = None if mins is None else unpermute_rows(mins, heads)
        return BlockQuantized(
            levels, scales.astype(np.float32), zero, bits, 32, tensor.shape[1], mins
        )

    def write_tokenizer(self, out_dir: Path) -> list[str]:
        """tokenizer.json + tokenizer_config.json built from the GGUF's tokenizer metadata.

        Metadata of a kind not built here raises :class:`UnsupportedTokenizerError` (a
        :class:`CheckpointError`; an export catches it and goes on without tokenizer files);
        corrupt metadata raises a plain :class:`CheckpointError`. Nothing is written then."""
        if "tokenizer.ggml.tokens" not in self.fields:
            return []
        try:
            return write_tokenizer_files(self.fields, out_dir)
        except UnsupportedTokenizerError as error:
            raise UnsupportedTokenizerError(error.reason, self.path) from None
        except ValueError as error:
            raise CheckpointError(f"{self.path}: {error}") from None
        except Exception as error:  # the tokenizers library raises bare Exceptions
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CheckpointError(f"{self.path}: tokenizer metadata refused ({message})") from None
