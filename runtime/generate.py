"""Text generation over an exported decoder: batching with left padding, greedy or sampled
decoding, stop tokens, streaming, and timing.

    gen = Generator("out/")                 # export directory
    gen.generate("Once upon a time", max_new_tokens=32)      # -> Generation
    for piece in gen.stream("Hello", max_new_tokens=16): print(piece, end="")
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphattn.runtime.kv_cache import CACHES, ContextLengthError
from graphattn.runtime.sampling import Sampler, SamplingOptions
from graphattn.runtime.session import ModelSession
from graphattn.runtime.tokenizer import StreamDecoder, Tokenizer, TokenizerError

Prompt = str | Sequence[int]


@dataclass
class Generation:
    """One prompt's result: new token ids, their text (when a tokenizer is present), timing."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None = None
    stopped_by: str = "length"  # "length" | "eos" | "stop"
    timings: dict = field(default_factory=dict)


@dataclass
class Timings:
    """Wall-clock seconds and token counts of the prefill and decode phases."""

    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    def as_dict(self) -> dict:
        """Seconds, counts and tokens/s."""
        return {
            "prefill_seconds": self.prefill_seconds,
            "prefill_tokens": self.prefill_tokens,
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_seconds
            if self.prefill_seconds
            else 0.0,
            "decode_seconds": self.decode_seconds,
            "decode_tokens": self.decode_tokens,
            "decode_tokens_per_s": self.decode_tokens / self.decode_seconds
            if self.decode_seconds
            else 0.0,
        }


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [B, max_len] int64 with each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = row
        mask[index, width - len(row) :] = 1
    return ids, mask


def positions(mask: np.ndarray, new: int) -> np.ndarray:
    """position_ids [B, new] of the last ``new`` columns: index among the row's real tokens."""
    return ((np.cumsum(mask, axis=1) - 1) * mask)[:, -new:].astype(np.int64)


class Generator:
    """Generation over a :class:`ModelSession` with a KV cache of ``max_length`` tokens.

    ``cache``: ``"auto"`` (``"shared"`` where the graph can append in place, else
    ``"bound"``), ``"shared"`` (one buffer per layer for past and present), ``"bound"``
    (preallocated, IOBinding, device-resident, two buffers in turn) or ``"plain"``.
    """

    def __init__(
        self,
        model: str | Path | ModelSession,
        *,
        provider: str = "auto",
        threads: int | None = None,
        max_length: int | None = None,
        cache: str = "auto",
    ) -> None:
        self.model = (
            model
            if isinstance(model, ModelSession)
            else ModelSession(model, provider=provider, threads=threads)
        )
        cfg = self.model.config
        context = cfg.context_length
        if max_length is not None and context is not None and max_length > context:
            raise ContextLengthError(
                f"max_length {max_length} exceeds the model's context {context}"
            )
        self.max_length = max_length or context or 2048
        if cache == "auto":
            cache = "shared" if self.model.shares_kv_buffer else "bound"
        if cache not in CACHES:
            raise ValueError(f"cache must be one of auto, {', '.join(CACHES)}, got {cache!r}")
        if cache == "shared" and not self.model.shares_kv_buffer:
            raise ValueError(
                f"{cfg.model_path}: cache 'shared' needs a graph whose attention appends in place"
                " (an ort-target export with GroupQueryAttention)"
            )
        self.cache = CACHES[cache](self.model, self.max_length)
        directory = self.model.export_dir
        self.tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None

    # ------------------------------------------------------------------ input
    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt (text needs the tokenizer; ids are checked against the vocab)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if self.tokenizer is None:
                raise TokenizerError("this export has no tokenizer.json: pass token ids")
            if chat:
                prompt = self.tokenizer.chat([{"role": "user", "content": prompt}])
                return self.tokenizer.encode(prompt, add_special_tokens=False)
            return self.tokenizer.encode(prompt)
        ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def _stop_ids(self, stop: Sequence[int] | None, use_eos: bool) -> set[int]:
        ids = set(self.model.config.eos_token_ids) if use_eos else set()
        return ids | {int(s) for s in (stop or ())}

    # ----------------------------------------------------------------- decode
    def token_steps(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        options: SamplingOptions,
        stop_ids: set[int],
        timings: Timings,
    ) -> Iterator[np.ndarray]:
        """Yields the next token id of every row [B] per step; -1 for rows already stopped."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_length:
            raise ContextLengthError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context"
                f" of {self.max_length} tokens"
            )
        ids, mask = left_pad(list(prompts), self.model.config.pad_token_id)
        sampler = Sampler(options)
        history = [np.array(p, dtype=np.int64) for p in prompts]
        self.cache.reset(len(prompts))
        alive = np.ones(len(prompts), dtype=bool)
        started = time.perf_counter()
        logits = self.cache.step(ids, mask, positions(mask, ids.shape[1]))
        timings.prefill_seconds += time.perf_counter() - started
        timings.prefill_tokens += int(mask.sum())
        for step in range(max_new_tokens):
            chosen = sampler(logits[:, -1, :], history)
            chosen = np.where(alive, chosen, -1)
            yield chosen
            for row, token in enumerate(chosen):
                if token >= 0:
                    history[row] = np.append(history[row], token)
                    if int(token) in stop_ids:
                        alive[row] = False
            if not alive.any() or step == max_new_tokens - 1:
                return
            feed = np.where(alive, chosen, self.model.config.pad_token_id)[:, None]
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
            started = time.perf_counter()
            logits = self.cache.step(feed.astype(np.int64), mask, positions(mask, 1))
            timings.decode_seconds += time.perf_counter() - started
            timings.decode_tokens += int(alive.sum())

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[int] | None = None,
        use_eos: bool = True,
        chat: bool = False,
    ) -> Generation | list[Generation]:
        """Generate for one prompt (returns a Generation) or a batch (returns a list)."""
        single = isinstance(prompts, str) or (
            len(prompts) > 0 and all(isinstance(t, (int, np.integer)) for t in prompts)
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise ValueError("the prompt is empty (no token ids or prompts given)")
        encoded = [self.encode(p, chat=chat) for p in batch]
        options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
        stop_ids = self._stop_ids(stop, use_eos)
        timings = Timings()
        results = [Generation(prompt_ids=ids, token_ids=[]) for ids in encoded]
        for chosen in self.token_steps(
            encoded,
            max_new_tokens=max_new_tokens,
            options=options,
            stop_ids=stop_ids,
            timings=timings,
        ):
            for row, token in enumerate(chosen):
                if token >= 0:
                    results[row].token_ids.append(int(token))
                    if int(token) in stop_ids:
                        eos = int(token) in self.model.config.eos_token_ids and use_eos
                        results[row].stopped_by = "eos" if eos else "stop"
        for result in results:
            if self.tokenizer is not None:
                kept = result.token_ids[:-1] if result.stopped_by != "length" else result.token_ids
                result.text = self.tokenizer.decode(kept)
            result.timings = timings.as_dict()
        return results[0] if single else results

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 32,
        chat: bool = False,
        timings: Timings | None = None,
        **sampling,
    ) -> Iterator[str]:
        """Yields text pieces of one prompt's continuation as they decode."""
        if self.tokenizer is None:
            raise TokenizerError("streaming text needs tokenizer.json in the export")
        stop, use_eos = sampling.pop("stop", None), sampling.pop("use_eos", True)
        options = SamplingOptions(**sampling)
        stop_ids = self._stop_ids(stop, use_eos)
        decoder = StreamDecoder(self.tokenizer)
        for chosen in self.token_steps(
            [self.encode(prompt, chat=chat)],
            max_new_tokens=max_new_tokens,
            options=options,
            stop_ids=stop_ids,
            timings=timings if timings is not None else Timings(),
        ):
            token = int(chosen[0])
            if token < 0 or token in stop_ids:
                break
            piece = decoder.push(token)
            if piece:
                yield piece
        rest = decoder.finish()
        if rest:
            yield rest
