"""Sentence embeddings from an encoder export (``graphattn export`` of BERT / ModernBERT).

``Embedder(export_dir).embed(texts) -> [N, hidden] float32``: the texts are tokenized with
the export's ``tokenizer.json`` (or a WordPiece ``vocab.txt``), right-padded into one batch,
run through ``model.onnx``; the result is the graph's ``sentence_embedding`` output when it
has one, else the mean of ``last_hidden_state`` over each row's real tokens, L2-normalized.

Needs onnxruntime, numpy and tokenizers only (never the builder).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MODEL_FILE = "model.onnx"
ENCODER_KEY = "graphattn.encoder"


class EmbedError(ValueError):
    """An export or input the embedder cannot use (one readable line)."""


def _tokenizer(directory: Path, max_length: int):
    from tokenizers import Tokenizer

    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        from tokenizers import BertWordPieceTokenizer

        settings = {}
        if (directory / "tokenizer_config.json").is_file():
            settings = json.loads((directory / "tokenizer_config.json").read_text())
        tokenizer = BertWordPieceTokenizer(
            str(directory / "vocab.txt"), lowercase=bool(settings.get("do_lower_case", True))
        )
    else:
        raise EmbedError(f"{directory}: no tokenizer.json or vocab.txt")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, C]``: mean of ``hidden [B, S, C]`` where ``mask [B, S]`` is 1, L2-normalized."""
    weights = mask.astype(np.float32)[:, :, None]
    pooled = (hidden.astype(np.float32) * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


class Embedder:
    """An onnxruntime session over an encoder export and its tokenizer."""

    def __init__(
        self, export_dir: str | Path, *, provider: str = "auto", threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        self.directory = Path(export_dir)
        model = self.directory / MODEL_FILE
        if not model.is_file():
            raise EmbedError(f"{self.directory}: no {MODEL_FILE} (not an export directory)")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        wanted = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}.get(
            provider, [p for p in ("CUDAExecutionProvider",) if p in available]
        )
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise EmbedError("provider cuda: this onnxruntime has no CUDAExecutionProvider")
        providers = [*wanted, "CPUExecutionProvider"] if provider != "cpu" else wanted
        self.session = ort.InferenceSession(str(model), options, providers=providers)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if ENCODER_KEY not in metadata:
            raise EmbedError(f"{self.directory}: not an encoder export (a decoder? use generate)")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        context = int(metadata.get("graphattn.context_length", 512))
        self.tokenizer = _tokenizer(self.directory, context)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Right-padded ``input_ids`` / ``attention_mask`` / ``token_type_ids`` [N, S] int64."""
        if not texts:
            raise EmbedError("no texts to embed")
        encodings = [self.tokenizer.encode(text) for text in texts]
        length = max(len(e.ids) for e in encodings)
        if length == 0:
            raise EmbedError("every text tokenized to nothing")
        feeds = {name: np.zeros((len(texts), length), np.int64) for name in self.input_names}
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            feeds["input_ids"][row, :n] = encoding.ids
            feeds["attention_mask"][row, :n] = 1
            if "token_type_ids" in feeds:
                feeds["token_type_ids"][row, :n] = encoding.type_ids
        return feeds

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), hidden]`` float32 unit vectors."""
        feeds = self.tokenize(texts)
        if "sentence_embedding" in self.output_names:
            (pooled,) = self.session.run(["sentence_embedding"], feeds)
            return pooled.astype(np.float32)
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return mean_pool_normalize(hidden, feeds["attention_mask"])
