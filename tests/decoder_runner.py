"""Drive an exported decoder directly (onnxruntime or the interpreter) with explicit caches."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphattn.interpreter import Interpreter
from graphattn.runtime.cache_layout import graph_layout


def positions_for(attention_mask: np.ndarray, query_len: int) -> np.ndarray:
    """position_ids of the last ``query_len`` columns: index among the row's real tokens."""
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0) * attention_mask
    return positions[:, -query_len:].astype(np.int64)


class Decoder:
    """``Decoder(out_dir)(ids, mask, past) -> (logits, presents)``; engine ort or interpreter.

    The cache is what the graph's ``past_key_values.{i}.<name>`` inputs say: ``self.cache``
    holds per layer its :class:`~graphattn.runtime.cache_layout.CacheTensor` s in input order;
    ``past`` and ``presents`` are per layer tuples in that order ((key, value) for ordinary
    attention, (latent, rope_key) for latent attention)."""

    def __init__(self, out_dir: Path, engine: str = "ort") -> None:
        self.config = json.loads((Path(out_dir) / "genai_config.json").read_text())["model"]
        path = Path(out_dir) / "model.onnx"
        graph = onnx.load(str(path), load_external_data=False).graph
        self.cache = graph_layout(graph, where=str(path))
        self.layers = len(self.cache)
        self.cache_names = [tuple(t.name for t in layer) for layer in self.cache]
        self.input_names = {v.name for v in graph.input}
        if engine == "ort":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.dtype = self.cache[0][0].dtype
            self._run = lambda feeds: dict(
                zip([o.name for o in session.get_outputs()], session.run(None, feeds))
            )
        else:
            interpreter = Interpreter(str(path))
            self.dtype = np.float32
            self._run = interpreter.run

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, ...]]:
        """Per layer, zero-length cache tensors of ``batch`` rows."""
        return [
            tuple(np.zeros(t.shape(batch, 0), dtype=self.dtype) for t in layer)
            for layer in self.cache
        ]

    def __call__(self, input_ids, attention_mask, past=None):
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        if "position_ids" in self.input_names:  # ort graphs with GroupQueryAttention lack it
            feeds["position_ids"] = positions_for(attention_mask, input_ids.shape[1])
        for tensors, arrays in zip(self.cache, past, strict=True):
            for tensor, array in zip(tensors, arrays, strict=True):
                feeds[tensor.past] = array
        out = self._run(feeds)
        presents = [tuple(out[t.present] for t in tensors) for tensors in self.cache]
        return out["logits"], presents


def decided_steps(reference_dir: Path, prompt: list[int], generated: list[int], margin: float):
    """How many greedy steps of ``generated`` (after ``prompt``, one row) have a top-2 logit
    margin above ``margin`` in the reference export, counted up to the first that does not:
    beyond it a lower-precision run may break a near-tie the other way."""
    ids = np.array([list(prompt) + list(generated)])
    logits, _ = Decoder(reference_dir)(ids, np.ones_like(ids))
    top2 = np.sort(logits[0, len(prompt) - 1 : -1], axis=-1)[:, -2:]
    close = np.flatnonzero(top2[:, 1] - top2[:, 0] <= margin)
    return int(close[0]) if close.size else len(generated)
