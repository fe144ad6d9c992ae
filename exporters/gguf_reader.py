"""Open a GGUF file as a checkpoint: Llama metadata → an HF-style ``config.json`` dict, GGUF
tensor names → HF names, tensors dequantized to float32 one at a time (memory-mapped), and the
Q/K row permutation that GGUF converters apply for RoPE undone.

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
from graphattn.exporters.gguf_tokenizer import write_tokenizer_files
from graphattn.exporters.safetensors_reader import CheckpointError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
LOSSLESS_KINDS = ("Q8_0", "Q4_0", "Q4_1")


def hf_name(gguf_name: str) -> str | None:
    """The HF (LlamaForCausalLM) name of a GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
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


def _require(fields: dict, key: str, path: Path):
    if key not in fields:
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is missing")
    return fields[key]


class GGUFCheckpoint:
    """A GGUF file with the interface of an HF checkpoint (config, tensors, load, tokenizer)."""

    def __init__(self, path: str | Path) -> None:
        self.directory = self.path = Path(path)
        try:
            self._file = read_gguf(self.path)
        except (GGUFFormatError, OSError) as error:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({error})") from None
        self.fields = self._file.fields
        self.config = self._config()
        self.tensors: dict[str, GGUFTensor] = {}
        for index, info in enumerate(self._file.tensors):
            name = hf_name(info.name)
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

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file."""
        return sum(t.nbytes for t in self.tensors.values())

    def _config(self) -> dict:
        f, path = self.fields, self.path
        arch = f.get("general.architecture")
        if arch != "llama":
            raise CheckpointError(
                f"{path}: GGUF architecture {arch!r} is not supported (only llama)"
            )
        heads = int(_require(f, "llama.attention.head_count", path))
        hidden = int(_require(f, "llama.embedding_length", path))
        tokens = f.get("tokenizer.ggml.tokens")
        vocab = f.get("llama.vocab_size", len(tokens) if tokens is not None else None)
        if vocab is None:
            raise CheckpointError(
                f"{path}: GGUF metadata 'llama.vocab_size' (or tokenizer.ggml.tokens) is missing"
            )
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": int(_require(f, "llama.feed_forward_length", path)),
            "num_hidden_layers": int(_require(f, "llama.block_count", path)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(f.get("llama.attention.head_count_kv", heads)),
            "head_dim": int(f.get("llama.attention.key_length", hidden // heads)),
            "max_position_embeddings": int(f.get("llama.context_length", 2048)),
            "rms_norm_eps": float(f.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(f.get("llama.rope.freq_base", 10000.0)),
            "vocab_size": int(vocab),
            "hidden_act": "silu",
            "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": f.get("tokenizer.ggml.padding_token_id"),
        }
        rotary = f.get("llama.rope.dimension_count")
        if rotary is not None and int(rotary) != config["head_dim"]:
            config["partial_rotary_factor"] = int(rotary) / config["head_dim"]
        scaling = f.get("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise CheckpointError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
            factor = float(_require(f, "llama.rope.scaling.factor", path))
            config["rope_scaling"] = {"type": "linear", "factor": factor}
        return config

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
        return array if heads is None else unpermute_rows(array, heads)

    def permuted_heads(self, name: str) -> int | None:
        """Head count whose RoPE permutation applies to ``name``'s rows, or None."""
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return self.config["num_attention_heads"]
        if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            return self.config["num_key_value_heads"]
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
        """tokenizer.json + tokenizer_config.json built from the GGUF's tokenizer metadata."""
        if "tokenizer.ggml.tokens" not in self.fields:
            return []
        try:
            return write_tokenizer_files(self.fields, out_dir)
        except ValueError as error:
            raise CheckpointError(f"{self.path}: {error}") from None
