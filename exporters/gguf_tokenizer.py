"""Build a ``tokenizers`` tokenizer (tokenizer.json) from a GGUF's ``tokenizer.ggml.*`` data.

Supported: ``tokenizer.ggml.model = gpt2`` (byte-level BPE) with pre-tokenizers ``default`` /
``gpt2`` (GPT-2 regex), ``smollm`` (each digit alone, then the GPT-2 regex) and ``llama-bpe``
(the Llama-3 regex). Control tokens (type 3) become special added tokens, user-defined ones
(type 4) plain added tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(kind: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind in ("default", "gpt2"):
        return byte_level
    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind == "llama-bpe":
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise ValueError(
        f"GGUF tokenizer.ggml.pre {kind!r} is not supported"
        " (known: default, gpt2, smollm, llama-bpe)"
    )


def build_tokenizer(fields: Mapping[str, object]) -> Tokenizer:
    """The tokenizer described by GGUF metadata ``fields`` (key → value)."""
    model_kind = fields.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model {model_kind!r} is not supported (only gpt2 BPE)"
        )
    tokens = list(fields["tokenizer.ggml.tokens"])
    merges = []
    for merge in fields.get("tokenizer.ggml.merges", []):
        left, _, right = str(merge).partition(" ")
        merges.append((left, right))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens holds duplicate tokens")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(fields.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()
    types = list(fields.get("tokenizer.ggml.token_type", []))
    added = [
        AddedToken(tokens[i], special=kind == CONTROL, normalized=False)
        for i, kind in enumerate(types)
        if kind in (CONTROL, USER_DEFINED)
    ]
    if added:
        tokenizer.add_tokens(added)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_token = tokens[int(bos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, int(bos))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def write_tokenizer_files(fields: Mapping[str, object], out_dir: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json (chat template, special tokens)."""
    tokenizer = build_tokenizer(fields)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokens = fields["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = fields.get(key)
        return None if index is None else str(tokens[int(index)])

    config = {
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = str(fields["tokenizer.chat_template"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
