"""Drive an exported decoder directly (onnxruntime or the interpreter) with explicit caches."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphattn.interpreter import Interpreter


def positions_for(attention_mask: np.ndarray, query_len: int) -> np.ndarray:
    """position_ids of the last ``query_len`` columns: index among the row's real tokens."""
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0) * attention_mask
    return positions[:, -query_len:].astype(np.int64)


class Decoder:
    """``Decoder(out_dir)(ids, mask, past) -> (logits, presents)``; engine ort or interpreter."""

    def __init__(self, out_dir: Path, engine: str = "ort") -> None:
        self.config = json.loads((Path(out_dir) / "genai_config.json").read_text())["model"]
        decoder = self.config["decoder"]
        self.layers = decoder["num_hidden_layers"]
        self.kv_heads, self.head_dim = decoder["num_key_value_heads"], decoder["head_size"]
        path = str(Path(out_dir) / "model.onnx")
        if engine == "ort":
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            past = next(i for i in session.get_inputs() if i.name.startswith("past_key_values"))
            self.dtype = np.float16 if "float16" in past.type else np.float32
            self.input_names = {i.name for i in session.get_inputs()}
            self._run = lambda feeds: dict(
                zip([o.name for o in session.get_outputs()], session.run(None, feeds))
            )
        else:
            interpreter = Interpreter(path)
            self.input_names = set(interpreter.input_names)
            self.dtype = np.float32
            self._run = interpreter.run

    def empty_past(self, batch: int):
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return [(empty, empty)] * self.layers

    def __call__(self, input_ids, attention_mask, past=None):
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        if "position_ids" in self.input_names:  # ort graphs with GroupQueryAttention lack it
            feeds["position_ids"] = positions_for(attention_mask, input_ids.shape[1])
        for i, (key, value) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = key
            feeds[f"past_key_values.{i}.value"] = value
        out = self._run(feeds)
        presents = [
            (out[f"present.{i}.key"], out[f"present.{i}.value"]) for i in range(self.layers)
        ]
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
