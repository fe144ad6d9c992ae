"""Build a ``tokenizers`` tokenizer (tokenizer.json) from a GGUF's ``tokenizer.ggml.*`` data.

Supported: ``tokenizer.ggml.model = gpt2`` (byte-level BPE) with the pre-tokenizers in
:data:`PRE_TOKENIZERS`, each named as llama.cpp's ``llama-vocab.cpp`` names it and split with
the regex llama.cpp uses for that name:

- ``default`` / ``gpt2`` / ``gpt-2``: the GPT-2 regex;
- ``smollm``: each digit alone, then the GPT-2 regex;
- ``llama-bpe`` / ``llama3`` / ``llama-v3`` / ``falcon3``: the Llama-3 regex (digits in runs of
  up to three), and a word found whole in the vocabulary is one token (``ignore_merges``);
- ``qwen2`` / ``deepseek-r1-qwen``: the Llama-3 regex with single digits (Qwen2 and Qwen3).

``tokenizer.ggml.model = llama`` (SentencePiece, as Llama-2, Gemma and Phi-3 files carry) is
a BPE with byte fallback (``<0xNN>`` tokens) whose merges come from the scores, so the
highest-scoring merge is taken first as SentencePiece and llama.cpp do; spaces are "▁" and each
text run gets a leading one unless ``tokenizer.ggml.add_space_prefix`` is false (Gemma).

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens. Metadata of a kind not built here raises :class:`UnsupportedTokenizerError`; metadata
that is corrupt raises :class:`ValueError` (or the library's bare ``Exception``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from graphattn.exporters.safetensors_reader import CheckpointError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4
_GPT2, _SMOLLM, _LLAMA3, _QWEN2 = "gpt2", "smollm", "llama3", "qwen2"
_SPM = "sentencepiece"  # tokenizer.ggml.model "llama": no pre-tokenizer name applies
# tokenizer.ggml.pre → the split it names (llama.cpp's llama-vocab.cpp, name → pre type → regex)
PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    "gpt-2": _GPT2,
    "smollm": _SMOLLM,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}
# The models' own tokenizer.json regexes (llama.cpp runs hand-expanded copies of these).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's clean_spaces = false for these: decoding keeps " ." and " 's" as they are
_NO_CLEAN_UP = (_SMOLLM, _QWEN2, _SPM)


class UnsupportedTokenizerError(CheckpointError):
    """The GGUF's tokenizer metadata is of a kind not built here (not corrupt): an export can
    still write the graph, without tokenizer files. ``reason`` names the key and its value."""

    def __init__(self, reason: str, path: Path | str | None = None) -> None:
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.reason, self.path = reason, path

    def warning(self) -> str:
        """The one line an export reports instead of failing."""
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}tokenizer not written ({self.reason}); pass the model's HF tokenizer files"


def pre_tokenizer_kind(fields: Mapping[str, object]) -> str:
    """The split named by ``tokenizer.ggml.pre`` (default ``default``), or
    :class:`UnsupportedTokenizerError`."""
    name = fields.get("tokenizer.ggml.pre", "default")
    kind = PRE_TOKENIZERS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise UnsupportedTokenizerError(
            f"GGUF tokenizer.ggml.pre {name!r} is not supported"
            f" (known: {', '.join(PRE_TOKENIZERS)})"
        )
    return kind


def _pre_tokenizer(kind: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == _GPT2:
        return byte_level
    if kind == _SMOLLM:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _LLAMA3_SPLIT if kind == _LLAMA3 else _QWEN2_SPLIT
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def check_supported(fields: Mapping[str, object]) -> str:
    """The pre-tokenizer kind (``sentencepiece`` for ``llama``) if ``fields`` describe a
    tokenizer built here, else :class:`UnsupportedTokenizerError` naming the key."""
    model_kind = fields.get("tokenizer.ggml.model")
    if model_kind == "llama":
        if fields.get("tokenizer.ggml.remove_extra_whitespaces"):
            raise UnsupportedTokenizerError(
                "GGUF tokenizer.ggml.remove_extra_whitespaces is not supported"
            )
        return _SPM
    if model_kind != "gpt2":
        raise UnsupportedTokenizerError(
            f"GGUF tokenizer.ggml.model {model_kind!r} is not supported"
            " (known: gpt2 byte-level BPE, llama SentencePiece)"
        )
    return pre_tokenizer_kind(fields)


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]):
    """BPE merges equivalent to SentencePiece's greedy encoding (llama.cpp's SPM tokenizer):
    every split of a normal piece into two normal pieces, the merged piece's score deciding
    the order (highest first, then the lower id)."""
    normal = {
        token: index
        for index, token in enumerate(tokens)
        if (types[index] if index < len(types) else NORMAL) == NORMAL
    }
    ranked = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[index]), index, cut, (left, right)))
    ranked.sort()
    return [pair for *_, pair in ranked]


def _sentencepiece(fields: Mapping[str, object], tokens: list[str]) -> Tokenizer:
    """A BPE with byte fallback whose merges come from the scores; spaces become "▁" and,
    unless ``tokenizer.ggml.add_space_prefix`` is false, each text run starts with one."""
    scores = list(fields.get("tokenizer.ggml.scores", []))
    if len(scores) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer.ggml.scores holds {len(scores)} values for {len(tokens)} tokens"
        )
    types = list(fields.get("tokenizer.ggml.token_type", []))
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(tokens, scores, types),
            unk_token=None if unk is None else tokens[int(unk)],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tokenizer.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
    return tokenizer


def add_bos_token(fields: Mapping[str, object]) -> bool:
    """``tokenizer.ggml.add_bos_token``; llama.cpp's default where it is missing (true for
    SentencePiece, false for BPE)."""
    return bool(fields.get("tokenizer.ggml.add_bos_token", check_supported(fields) == _SPM))


def build_tokenizer(fields: Mapping[str, object]) -> Tokenizer:
    """The tokenizer described by GGUF metadata ``fields`` (key → value)."""
    pre = check_supported(fields)
    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = []
    for merge in fields.get("tokenizer.ggml.merges", []):
        left, _, right = str(merge).partition(" ")
        merges.append((left, right))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens holds duplicate tokens")
    if pre == _SPM:
        tokenizer = _sentencepiece(fields, tokens)
    else:
        tokenizer = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre == _LLAMA3)
        )
        tokenizer.pre_tokenizer = _pre_tokenizer(pre)
        tokenizer.decoder = decoders.ByteLevel()
    types = list(fields.get("tokenizer.ggml.token_type", []))
    added = [
        AddedToken(tokens[i], special=token_type == CONTROL, normalized=False)
        for i, token_type in enumerate(types)
        if token_type in (CONTROL, USER_DEFINED)
    ]
    if added:
        tokenizer.add_tokens(added)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if add_bos_token(fields) and bos is not None:
        bos_token = tokens[int(bos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, int(bos))],
        )
    elif pre != _SPM:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def write_tokenizer_files(fields: Mapping[str, object], out_dir: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json (chat template, special tokens).

    Nothing is written when the tokenizer cannot be built."""
    tokenizer = build_tokenizer(fields)
    tokens = fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = fields.get(key)
        return None if index is None else str(tokens[int(index)])

    config = {
        "add_bos_token": add_bos_token(fields),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if check_supported(fields) in _NO_CLEAN_UP:
        config["clean_up_tokenization_spaces"] = False
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = str(fields["tokenizer.chat_template"])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
