"""GGUF tokenizers beyond GPT-2's split, each checked against the independent encoder in
``bpe_reference``: the ``qwen2`` and ``llama-bpe`` pre-tokenizers (and their llama.cpp
aliases), and what an export does with tokenizer metadata it cannot build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf extra is not installed")
pytest.importorskip("regex", reason="the reference encoder needs the regex package")

import bpe_reference  # noqa: E402
import checkpoints  # noqa: E402
import gguf_files  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from graphattn import export  # noqa: E402
from graphattn.exporters.convert import convert  # noqa: E402
from graphattn.exporters.gguf_reader import GGUFCheckpoint  # noqa: E402
from graphattn.exporters.gguf_tokenizer import (  # noqa: E402
    PRE_TOKENIZERS,
    UnsupportedTokenizerError,
    build_tokenizer,
)
from graphattn.exporters.safetensors_reader import CheckpointError  # noqa: E402
from graphattn.runtime import Tokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Once upon a time there was a little graph that wanted to attend.",
    "def attention(query, key, value):\n    return softmax(query @ key.T) @ value",
    "Héllo wörld — ünïcode text, emoji 🙂 and 日本語 too.",
    "    indented   code   with    whitespace runs\n\tand tabs\r\n",
    "12345 12345 123 45 123 12 1 2 3 45 678 2024-06-01 3.14159 x = [1, 22, 333, 4444]",
    "I'm sure it's THEY'LL and we've you'd they're",
] * 20
# A vocabulary token with no merges leading to it: only ignore_merges (llama-bpe) finds it.
UNMERGEABLE = "Ġgraphattn"
TEXTS = [
    "Once upon a time",
    "12345",
    "x = 1234567 + 89 and 2024-06-01 at 3.14159",
    "Héllo wörld 🙂 日本語 ünïcode",
    "def attention(query, key):\n    return 42 * 7\r\n",
    "    whitespace    runs\t\tand\n\n\nnewlines   ",
    "<|im_start|>user\nhi 123<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure it's THEY'LL and we've",
    "call graphattn now",
]
CONFIG = {**checkpoints.LLAMA, "hidden_size": 32, "intermediate_size": 48}


@pytest.fixture(scope="module")
def vocabulary():
    """(tokens, merges, token types) of a small byte-level BPE trained here with the GPT-2
    split, so digit runs are merged ("123", "12345") and a split that cuts them matters."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokens, merges, types = gguf_files.tokenizer_metadata(json.loads(tokenizer.to_str()))
    assert UNMERGEABLE not in tokens
    return [*tokens, UNMERGEABLE], merges, [*types, 1]


def fields_for(vocabulary, pre: str, **extra) -> dict:
    tokens, merges, types = vocabulary
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
        **extra,
    }


def reference_for(vocabulary, split: str) -> bpe_reference.ByteBPE:
    tokens, merges, types = vocabulary
    specials = [t for t, kind in zip(tokens, types) if kind == 3]
    return bpe_reference.ByteBPE(
        tokens, merges, specials, pre=split, ignore_merges=split == "llama-bpe"
    )


# tokenizer.ggml.pre as GGUF files carry it → the reference split it must equal
SPLITS = {
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "llama-bpe": "llama-bpe",
    "llama3": "llama-bpe",
    "falcon3": "llama-bpe",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "default": "gpt2",
    "smollm": "smollm",
}


def test_every_known_name_is_tested():
    assert set(SPLITS) <= set(PRE_TOKENIZERS)
    assert {"qwen2", "llama-bpe", "smollm", "gpt2", "default"} <= set(SPLITS)


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_pre_tokenizer_matches_the_reference_and_round_trips(vocabulary, pre):
    ours = build_tokenizer(fields_for(vocabulary, pre))
    reference = reference_for(vocabulary, SPLITS[pre])
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), (pre, text)
        assert ours.decode(ids, skip_special_tokens=False) == text, (pre, text)


def test_the_splits_disagree_where_they_should(vocabulary):
    """The vocabulary merges digit runs, so each split is visible in the ids."""
    tokens = vocabulary[0]
    qwen2 = build_tokenizer(fields_for(vocabulary, "qwen2"))
    llama3 = build_tokenizer(fields_for(vocabulary, "llama-bpe"))
    gpt2 = build_tokenizer(fields_for(vocabulary, "gpt2"))
    assert [tokens[i] for i in qwen2.encode("12345").ids] == list("12345")
    pieces = [tokens[i] for i in llama3.encode("12345").ids]
    assert len(pieces) < 5 and len("".join(pieces[:-1])) in (3, 4), pieces  # "123" | "45"
    assert [tokens[i] for i in gpt2.encode("12345").ids] == ["12345"]
    assert llama3.encode(" graphattn").ids == [tokens.index(UNMERGEABLE)]  # ignore_merges
    assert len(qwen2.encode(" graphattn").ids) > 1


def _write(path: Path, vocabulary, monkeypatch, pre: str = "qwen2", model: str = "gpt2"):
    """A tiny Llama GGUF whose tokenizer metadata says ``model`` / ``pre``."""
    tokens, merges, types = vocabulary

    class Writer(gguf_files.GGUFWriter):
        def add_tokenizer_model(self, _model: str) -> None:
            super().add_tokenizer_model(model)

        def add_tokenizer_pre(self, _pre: str) -> None:
            super().add_tokenizer_pre(pre)

    monkeypatch.setattr(gguf_files, "GGUFWriter", Writer)
    tokenizer_json = {
        "model": {"vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
        "added_tokens": [
            {"id": i, "content": t, "special": True} for i, t in enumerate(tokens) if types[i] == 3
        ],
    }
    config = {**CONFIG, "vocab_size": len(tokens)}
    weights = checkpoints.random_weights(config, seed=3)
    gguf_files.write_gguf(path, config, weights, {}, tokenizer_json)
    return path


def test_qwen2_gguf_exports_a_tokenizer_that_matches(vocabulary, tmp_path, monkeypatch):
    path = _write(tmp_path / "qwen.gguf", vocabulary, monkeypatch, pre="qwen2")
    result = export(path, tmp_path / "onnx")
    assert result.warnings == []
    assert sorted(p.name for p in result.tokenizer_files) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ours = Tokenizer(tmp_path / "onnx")
    reference = reference_for(vocabulary, "qwen2")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    config = json.loads((tmp_path / "onnx" / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False


UNSUPPORTED = {
    "pre": ("qwen2", "xyz", "GGUF tokenizer.ggml.pre 'xyz' is not supported"),
    "model": ("bert", "default", "GGUF tokenizer.ggml.model 'bert' is not supported"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_tokenizer_exports_the_graph_with_a_warning(
    vocabulary, tmp_path, monkeypatch, case
):
    model, pre, reason = UNSUPPORTED[case]
    model = "gpt2" if case == "pre" else model
    path = _write(tmp_path / "odd.gguf", vocabulary, monkeypatch, pre=pre, model=model)
    with pytest.raises(UnsupportedTokenizerError, match=reason):  # the reader itself still refuses
        GGUFCheckpoint(path).write_tokenizer(tmp_path)
    result = export(path, tmp_path / "onnx")
    expected = f"{path}: tokenizer not written ({reason}"
    assert len(result.warnings) == 1 and result.warnings[0].startswith(expected)
    assert result.warnings[0].endswith("); pass the model's HF tokenizer files")
    assert result.tokenizer_files == []
    names = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert names == ["genai_config.json", "model.onnx", "model.onnx.data"]
    done = subprocess.run(
        [sys.executable, "-m", "graphattn", "export", str(path), "-o", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {result.warnings[0]}"]
    assert (tmp_path / "cli" / "model.onnx").is_file()
    assert not (tmp_path / "cli" / "tokenizer.json").exists()
    notes: list[str] = []
    paths = convert(path, tmp_path / "hf", notes=notes)
    assert sorted(p.name for p in paths) == ["config.json", "model.safetensors"]
    assert notes == result.warnings
    with pytest.warns(UserWarning, match="tokenizer not written"):  # without notes
        convert(path, tmp_path / "hf3")
    done = subprocess.run(
        [sys.executable, "-m", "graphattn", "convert", str(path), "-o", str(tmp_path / "hf2")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"warning: {result.warnings[0]}"]


def test_corrupt_tokenizer_metadata_still_fails_the_export(vocabulary, tmp_path, monkeypatch):
    tokens, merges, types = vocabulary
    broken = (tokens, [*merges, "a !!!"], types)  # a merge of a token not in the vocabulary
    path = _write(tmp_path / "bad.gguf", broken, monkeypatch, pre="qwen2")
    with pytest.raises(CheckpointError, match="tokenizer metadata refused") as raised:
        export(path, tmp_path / "onnx")
    assert not isinstance(raised.value, UnsupportedTokenizerError)
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(CheckpointError, match="tokenizer metadata refused"):
        convert(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# SentencePiece (tokenizer.ggml.model "llama"): a tiny vocabulary built here, scores shuffled
# so the greedy order matters, <0xNN> byte tokens for characters outside it.
SPM_PIECES = [
    "▁t",
    "he",
    "▁the",
    "▁a",
    "in",
    "▁in",
    "er",
    "on",
    "▁on",
    "an",
    "at",
    "re",
    "▁w",
    "or",
    "▁wor",
    "ld",
    "▁world",
    "▁H",
    "ll",
    "llo",
    "▁Hello",
    "▁▁",
    "▁▁▁▁",
    "▁up",
    "upon",
    "▁upon",
    "▁ti",
    "me",
    "▁time",
    "On",
    "ce",
    "▁Once",
    "12",
    "123",
    "▁1",
    "de",
    "f▁",
    "▁def",
    "()",
    "ion",
    "tion",
    "▁atten",
    "▁attention",
    "\n\n",
    "▁\n",
    "us",
    "er\n",
]
SPM_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
SPM_TEXTS = [
    "Once upon a time",
    "Hello world, the world in 12345!",
    "def attention():\n    return 42\n\n",
    "    whitespace    runs\t\tand\n\n\nnewlines   ",
    "Héllo wörld 🙂 日本語",
]


def spm_vocabulary(seed: int = 0):
    """(tokens, scores, types): <unk> <s> </s>, the 256 byte tokens, printable ASCII and "▁"
    as single pieces, SPM_PIECES, then two control tokens."""
    import numpy as np

    # every character of a piece is a piece too, as SentencePiece training leaves it (a BPE
    # cannot merge characters it has already turned into bytes)
    singles = ["▁", *(chr(c) for c in range(33, 127)), "\t", "\n"]
    normal = [*singles, *SPM_PIECES]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *normal]
    types = [2, 3, 3, *[6] * 256, *[1] * len(normal)]
    rng = np.random.default_rng(seed)
    scores = [0.0] * (3 + 256) + [-1000.0 - i for i in range(len(singles))]
    scores += [float(s) for s in -rng.permutation(len(SPM_PIECES))]
    tokens += SPM_SPECIALS
    types += [3, 3]
    scores += [0.0, 0.0]
    assert len(set(tokens)) == len(tokens)
    return tokens, scores, types


def spm_fields(vocabulary, **extra) -> dict:
    tokens, scores, types = vocabulary
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_matches_the_reference_and_round_trips(seed, prefix):
    vocabulary = spm_vocabulary(seed)
    ours = build_tokenizer(spm_fields(vocabulary, **{"tokenizer.ggml.add_space_prefix": prefix}))
    reference = bpe_reference.SentencePieceBPE(*vocabulary, add_space_prefix=prefix, bos=1)
    tokens = vocabulary[0]
    for text in [*SPM_TEXTS, "<start_of_turn>user\nhi<end_of_turn>\n"]:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), (text, [tokens[i] for i in ids])
    for text in SPM_TEXTS:
        ids = ours.encode(text).ids
        assert ids[0] == 1  # add_bos defaults to true for SentencePiece, as in llama.cpp
        assert ours.decode(ids) == text
    assert any(t.startswith("<0x") for t in (tokens[i] for i in ours.encode("é🙂").ids))


def test_sentencepiece_gguf_exports_a_tokenizer_that_matches(tmp_path, monkeypatch):
    vocabulary = spm_vocabulary(0)
    tokens, scores, types = vocabulary

    class Writer(gguf_files.GGUFWriter):
        def add_tokenizer_model(self, _model: str) -> None:
            super().add_tokenizer_model("llama")

        def add_tokenizer_pre(self, _pre: str) -> None:
            pass

        def add_token_merges(self, _merges) -> None:
            self.add_token_scores(scores)
            self.add_add_space_prefix(False)

        def add_token_types(self, _types) -> None:
            super().add_token_types(types)

    monkeypatch.setattr(gguf_files, "GGUFWriter", Writer)
    tokenizer_json = {"model": {"vocab": {t: i for i, t in enumerate(tokens)}, "merges": []}}
    tokenizer_json["added_tokens"] = []
    config = {**CONFIG, "vocab_size": len(tokens)}
    path = tmp_path / "gemma-like.gguf"
    gguf_files.write_gguf(
        path, config, checkpoints.random_weights(config, seed=4), {}, tokenizer_json
    )
    result = export(path, tmp_path / "onnx")
    assert result.warnings == [] and len(result.tokenizer_files) == 2
    ours = Tokenizer(tmp_path / "onnx")
    reference = bpe_reference.SentencePieceBPE(*vocabulary, add_space_prefix=False, bos=None)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text  # the file says add_bos_token false
        assert ours.decode(ids) == text
