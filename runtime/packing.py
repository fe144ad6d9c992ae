"""Packed prefill: several prompts in one row, then each continues as its own sequence.

A graph exported with ``segment_ids`` (``graphattn export --segment-ids``) takes
``segment_ids [batch_size, total_sequence_length]`` int64, the document id of every slot (0 =
padding), instead of ``position_ids``: attention stays inside each document and positions
restart at each one, so a row holding several prompts computes what each prompt alone
would, with no padding::

    gen = Generator("out/", cache="plain")          # or "bound"
    results = generate_packed(gen, [[5, 6, 7], [40, 41], [9, 8, 7, 6]], max_new_tokens=16)

:func:`pack` lays the prompts out (documents 1, 2, ... in order); :func:`prefill` runs the
packed row through the generator's cache and returns its logits; :func:`split` cuts each
document's slice out of every cache tensor into its own row of an ordinary left-padded
batch (mask ``[D, L]``, ``L`` the longest prompt), which the cache then holds; after it the
rows decode as any batch does (``segment_ids = attention_mask``), greedy or sampled.
The graph must output logits for every position (``--all-logits``): each document's next
token comes from its own last position.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from graphattn.runtime.generate import Generation, Generator, Prompt, Timings, positions
from graphattn.runtime.kv_cache import ContextLengthError
from graphattn.runtime.sampling import Sampler, SamplingOptions


@dataclass(frozen=True)
class Packed:
    """One row of several prompts: ``input_ids``, ``attention_mask`` (ones),
    ``segment_ids`` (document ``d + 1`` on prompt ``d``'s tokens) and ``position_ids``
    (restarting at each document), each ``[1, N]`` int64 with ``N`` the total length;
    ``starts`` and ``lengths``: each document's slots."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def last_positions(self) -> list[int]:
        """Each document's last slot (where its next token's logits are)."""
        return [s + n - 1 for s, n in zip(self.starts, self.lengths)]


def pack(prompts: Sequence[Sequence[int]]) -> Packed:
    """Lay ``prompts`` (token id lists, none empty) out in one row, in order."""
    if not prompts:
        raise ValueError("pack: no prompts given")
    lengths = tuple(len(p) for p in prompts)
    if min(lengths) < 1:
        raise ValueError(f"pack: prompt {lengths.index(0)} is empty")
    starts = tuple(int(s) for s in np.cumsum((0, *lengths[:-1])))
    ids = np.array([[int(t) for p in prompts for t in p]], dtype=np.int64)
    segments = np.concatenate([np.full(n, d + 1, np.int64) for d, n in enumerate(lengths)])
    places = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    return Packed(ids, np.ones_like(ids), segments[None], places[None], starts, lengths)


def _check_graph(generator: Generator) -> None:
    model = generator.model
    if not model.has_segment_ids:
        raise ValueError(
            f"{model.config.model_path}: packing needs a graph with a segment_ids input"
            " (export with --segment-ids)"
        )
    if model.last_logits_only:
        raise ValueError(
            f"{model.config.model_path}: packing needs logits for every position"
            " (export with --all-logits): each document continues from its own last position"
        )
    if not hasattr(generator.cache, "load"):
        raise ValueError(
            f"packing works with the plain and bound caches, not {generator.cache.name}"
        )


def prefill(generator: Generator, packed: Packed) -> np.ndarray:
    """Run the packed row (an empty cache of batch 1 first); returns logits ``[1, N, V]``."""
    _check_graph(generator)
    cache = generator.cache
    cache.reset(1)
    cache.segment_ids = packed.segment_ids
    try:
        return cache.step(packed.input_ids, packed.attention_mask, packed.position_ids)
    finally:
        cache.segment_ids = None


def split(generator: Generator, packed: Packed) -> np.ndarray:
    """Turn the cache of the packed row into a left-padded batch of its documents (row ``d``:
    document ``d``'s slice of every cache tensor, right-aligned, zeros before); returns that
    batch's ``attention_mask [D, L]``."""
    cache, layout = generator.cache, generator.model.cache_layout
    width = max(packed.lengths)
    rows = len(packed.lengths)
    batched = []
    for tensors, arrays in zip(layout, cache.layers()):
        per_layer = []
        for t, array in zip(tensors, arrays):
            out = np.zeros(t.shape(rows, width), dtype=array.dtype)
            for d, (start, n) in enumerate(zip(packed.starts, packed.lengths)):
                piece = np.take(
                    np.take(array, [0], axis=t.batch_axis),
                    range(start, start + n),
                    axis=t.time_axis,
                )
                target = [slice(None)] * out.ndim
                target[t.batch_axis] = slice(d, d + 1)
                target[t.time_axis] = slice(width - n, width)
                out[tuple(target)] = piece
            per_layer.append(out)
        batched.append(tuple(per_layer))
    cache.load(batched, width)
    mask = np.zeros((rows, width), dtype=np.int64)
    for d, n in enumerate(packed.lengths):
        mask[d, width - n :] = 1
    return mask


def packed_steps(
    generator: Generator,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    options: SamplingOptions,
    stop_ids: set[int],
    timings: Timings,
) -> Iterator[np.ndarray]:
    """Like :meth:`Generator.token_steps` with a packed prefill: yields the next token id of
    every prompt ``[D]`` per step; -1 for prompts already stopped."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    packed = pack(prompts)
    total, longest = packed.input_ids.shape[1], max(packed.lengths)
    if max(total, longest + max_new_tokens) > generator.max_length:
        raise ContextLengthError(
            f"packed prompts of {total} tokens (longest {longest}) + {max_new_tokens} new tokens"
            f" exceed the context of {generator.max_length} tokens"
        )
    started = time.perf_counter()
    logits = prefill(generator, packed)[0, packed.last_positions][:, None, :]
    mask = split(generator, packed)
    timings.prefill_seconds += time.perf_counter() - started
    timings.prefill_tokens += total
    sampler, pad = Sampler(options), generator.model.config.pad_token_id
    history = [np.array(p, dtype=np.int64) for p in prompts]
    alive = np.ones(len(prompts), dtype=bool)
    for step in range(max_new_tokens):
        chosen = np.where(alive, sampler(logits[:, -1, :], history), -1)
        yield chosen
        for row, token in enumerate(chosen):
            if token >= 0:
                history[row] = np.append(history[row], token)
                alive[row] &= int(token) not in stop_ids
        if not alive.any() or step == max_new_tokens - 1:
            return
        feed = np.where(alive, chosen, pad)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        started = time.perf_counter()
        logits = generator.cache.step(feed, mask, positions(mask, 1))
        timings.decode_seconds += time.perf_counter() - started
        timings.decode_tokens += int(alive.sum())


def generate_packed(
    generator: Generator,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[int] | None = None,
    use_eos: bool = True,
) -> list[Generation]:
    """:meth:`Generator.generate` for a list of prompts, prefilled packed in one row."""
    encoded = [generator.encode(p) for p in prompts]
    options = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
    stop_ids = generator._stop_ids(stop, use_eos)
    timings = Timings()
    results = [Generation(prompt_ids=ids, token_ids=[]) for ids in encoded]
    eos = set(generator.model.config.eos_token_ids) if use_eos else set()
    steps = packed_steps(
        generator,
        encoded,
        max_new_tokens=max_new_tokens,
        options=options,
        stop_ids=stop_ids,
        timings=timings,
    )
    for chosen in steps:
        for row, token in enumerate(chosen):
            if token >= 0:
                results[row].token_ids.append(int(token))
                if int(token) in stop_ids:
                    results[row].stopped_by = "eos" if int(token) in eos else "stop"
    for result in results:
        if generator.tokenizer is not None:
            kept = result.token_ids[:-1] if result.stopped_by != "length" else result.token_ids
            result.text = generator.tokenizer.decode(kept)
        result.timings = timings.as_dict()
    return results


__all__ = ["Packed", "generate_packed", "pack", "packed_steps", "prefill", "split"]
