"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingOptions:
    """``temperature == 0`` means greedy (argmax). ``top_k == 0`` and ``top_p == 1`` disable
    those filters. ``repetition_penalty > 1`` divides positive (multiplies negative) logits of
    tokens already in the sequence. ``seed`` makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """True when no randomness is involved."""
        return self.temperature == 0


def apply_repetition_penalty(logits_V: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """A copy of ``logits [V]`` with the tokens in ``seen`` made less likely by ``penalty``."""
    if penalty == 1.0 or len(seen) == 0:
        return logits_V
    out = logits_V.copy()
    tokens = np.unique(seen)
    chosen = out[tokens]
    out[tokens] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def filtered_probabilities(logits_V: np.ndarray, options: SamplingOptions) -> np.ndarray:
    """Probabilities [V] after temperature, top-k and top-p (float64, sums to 1)."""
    scaled = logits_V.astype(np.float64) / options.temperature
    if options.top_k and options.top_k < scaled.size:
        kth = np.partition(scaled, -options.top_k)[-options.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if options.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < options.top_p  # smallest prefix reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


class Sampler:
    """Picks one token per row; holds the seeded random generator across steps."""

    def __init__(self, options: SamplingOptions) -> None:
        self.options = options
        self.rng = np.random.default_rng(options.seed)

    def __call__(self, logits_BV: np.ndarray, history: list[np.ndarray]) -> np.ndarray:
        """Next token ids [B] from last-position logits [B, V] and each row's token history."""
        chosen = np.empty(logits_BV.shape[0], dtype=np.int64)
        for row, logits in enumerate(logits_BV):
            logits = apply_repetition_penalty(
                logits.astype(np.float32), history[row], self.options.repetition_penalty
            )
            if self.options.greedy:
                chosen[row] = int(np.argmax(logits))
            else:
                probs = filtered_probabilities(logits, self.options)
                target = (1.0 - self.rng.random()) * probs.sum()  # in (0, total]
                index = int(np.searchsorted(np.cumsum(probs), target))
                chosen[row] = min(index, probs.size - 1)
        return chosen
