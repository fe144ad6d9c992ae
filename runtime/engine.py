"""Continuous batching over an exported decoder: requests join and leave between steps.

    engine = Engine("out/", max_running=16)
    request = engine.submit(ids, RequestParams(max_tokens=32, temperature=0.0))
    engine.start()                     # or call engine.step() yourself
    for piece in request.deltas(timeout=30): print(piece, end="")
    engine.stop()

KV stores (``Engine.kv_store``, chosen by the export; the API is the same):

- ``"paged"`` (:mod:`graphattn.runtime.engine_paged`), exports with metadata
  ``graphattn.kv_layout=paged``: a pool of blocks per layer and a block table per sequence;
  one call mixes prefill chunks and decodes (split in two when padding costs more, see
  ``CALL_COST``); admission by free blocks, preemption by recompute when a row needs a block
  and none is free, prefix sharing of full prompt blocks (``prefix_sharing``).
- ``"in_place_slots"`` (:mod:`graphattn.runtime.engine_slots`), GroupQueryAttention graphs on
  the CPU: one ``[max_running, Hkv, capacity, D]`` buffer per cache tensor bound in place;
  the slot-position rules below (rows right-aligned on one axis, joins prefilled to end at
  its last slot), without copying the cache in any step.
- ``"slots"``: NumPy rows through ``session.run``, described next (and, with
  ``cache="plain"``, the slot-position rules for GroupQueryAttention graphs).

Per-slot rows with per-row lengths. Every running sequence is one row of a
batch whose cache tensors share one time axis of ``T`` slots; ``mask [rows, T]`` says which
slots of a row hold its tokens (0 = a hole, never attended) and each row keeps its own
position counter, fed as explicit ``position_ids``. One step is one graph call over every
running row: a row still prefilling contributes a chunk of its prompt (chunks share the
step's ``token_budget`` in FIFO order, each at most ``token_budget // rows`` since the call
computes rows × width positions, pads included), a decoding row its one next token; a row with fewer
new tokens than the step's widest is left-padded inside the new-token block with mask 0. A
request joins between steps (its row starts as ``T`` masked slots), leaves at once when
finished or cancelled (its row is deleted: the cache memory is freed), and the time axis is
compacted (each row's tokens gathered to the right end, order kept) when holes dominate.

Graphs whose attention is onnxruntime's GroupQueryAttention (``ort`` target, head_dim a
multiple of 16; model metadata ``graphattn.kv_buffer=shared`` or
``graphattn.batched_continuation=one_token``) rotate keys and queries by their *cache slot*,
not by ``position_ids``, so a hole inside a row would shift its positions. There the engine
never makes holes: every step is a decode call in which every row adds one token, and a
joining request's prompt (all but its last token) is first run alone in its own call, over a
masked zero past, so that it lands in the slots just before the batch's next one (the same
slot offset for all of its tokens, which RoPE does not see). A new batch's axis starts
``slot_headroom`` slots long (masked; min(64, context / 8), where the first request still
fits) so that prompts up to that length join at once; a longer one waits (FIFO) until the
axis is at least as long as its prompt, and the axis is never compacted (that would shift
the stored rotations); it restarts when the batch empties.

Memory: ``kv_budget`` cache slots (rows × tokens, default ``max_running`` × context) bound
the tokens held; a request is admitted when its prompt fits in what is free, and when a step
would pass the budget the youngest running request is preempted: its row is freed and it is
requeued at the front, its prompt and generated tokens recomputed when it is readmitted
(its sampler's random state is kept, so a seeded request's tokens do not change).

Additions to the agreed API: ``Engine(kv_budget=...)``; ``Request.text`` (the final text),
``Request.token_ids``; ``Request.wait(timeout)``; ``Request.logits`` (with
``Engine(record_logits=True)``); ``Request.error`` and finish reason ``"error"`` when a graph call
failed on the background thread; ``stats()`` also reports ``cache_slots`` (allocated rows × T),
``cache_rows``, ``preemptions``, ``compactions``, ``steps``, ``prompt_tokens``;
``Engine.run_until_idle()``, ``Engine.has_work()``. Under slot positions the joins of one
step prefill at most ``token_budget`` prompt tokens (at least one request).
``cache`` accepts ``"auto"`` or ``"plain"`` (NumPy arrays through ``session.run``).
Paged exports: ``stats()`` adds the pool counters (``blocks_used``, ``blocks_free``,
``block_allocations``, ``block_frees``, ...), ``prefix_cached_tokens``, ``graph_calls``.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphattn.runtime.engine_paged import CALL_COST, PagedSteps, PagedStore
from graphattn.runtime.engine_slots import InPlaceSlots
from graphattn.runtime.sampling import Sampler, SamplingOptions
from graphattn.runtime.session import CONTINUATION_KEY, KV_BUFFER_KEY, ModelSession
from graphattn.runtime.tokenizer import Tokenizer

_DONE = object()


class QueueFull(Exception):  # noqa: N818 (the agreed API name)
    """The engine's queue holds ``max_queue`` requests already."""


class PromptTooLong(ValueError):  # noqa: N818 (the agreed API name)
    """A prompt leaves no room for one new token in the context (or the KV budget)."""


@dataclass(frozen=True)
class RequestParams:
    """Per-request generation settings; ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    use_eos: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be ids >= 0, got {self.stop_token_ids!r}")
        self.sampling()  # temperature, top_p, top_k, repetition_penalty checked there

    def sampling(self) -> SamplingOptions:
        """The :class:`SamplingOptions` of these parameters."""
        return SamplingOptions(
            self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed
        )


class Request:
    """One submitted sequence. Read its tokens with :meth:`tokens` or its text with
    :meth:`deltas` (one reader per request); both end when it finishes."""

    def __init__(self, engine: Engine, rid: str, prompt: list[int], params: RequestParams):
        self.id, self.prompt_ids, self.params = rid, prompt, params
        self.prompt_tokens = len(prompt)
        self.token_ids: list[int] = []
        self.logits: list[np.ndarray] = []  # with Engine(record_logits=True): per token [V]
        self.error: str | None = None  # what failed, when finish_reason is "error"
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.text = ""  # the text so far (stop strings cut), final once finished
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._engine = engine
        self._events: queue.Queue = queue.Queue()  # (token, text piece) ... then _DONE
        self._done = threading.Event()
        self.sampler = Sampler(params.sampling())
        self.stop_ids = set(params.stop_token_ids)
        if params.use_eos:
            self.stop_ids |= set(engine.model.config.eos_token_ids)
        self.decoder = engine.tokenizer  # text is decoded (and stop strings read) when set
        self.emitted = ""  # text handed to deltas()

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids)

    @property
    def finished(self) -> bool:
        """True once a finish reason is set."""
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the request's cache row is freed at once."""
        self._engine._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (or ``timeout`` seconds); returns whether it finished."""
        return self._done.wait(timeout)

    def _events_until_done(self, timeout: float | None) -> Iterator[tuple[int | None, str]]:
        while True:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: nothing new within {timeout} s") from None
            if event is _DONE:
                return
            yield event

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Generated token ids as they come (stop ids included); ``timeout`` bounds each wait
        (TimeoutError)."""
        for token, _ in self._events_until_done(timeout):
            if token is not None:
                yield token

    def deltas(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces as they decode, stop strings applied (the stop string and what follows
        it never appear); needs the export's tokenizer."""
        if self.decoder is None:
            raise ValueError("text deltas need tokenizer.json in the export")
        for _, piece in self._events_until_done(timeout):
            if piece:
                yield piece

    # ------------------------------------------------------------ engine side
    def _emit(self, token: int | None, piece: str) -> None:
        if token is not None and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._events.put((token, piece))

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finish_reason = reason
        self._events.put(_DONE)
        self._done.set()


class _Row:
    """A running request's place in the batch: tokens not yet in the cache, its position."""

    def __init__(self, request: Request) -> None:
        self.request = request
        # recompute after preemption: the prompt and every generated token
        self.pending = list(request.prompt_ids) + list(request.token_ids)
        self.position = 0  # real tokens cached
        self.chunk = 0  # tokens fed this step
        self.order = next(_admissions)  # admission order: the largest is the youngest


_admissions = itertools.count()


class Engine(PagedSteps):
    """Continuous batching over one export (see the module docstring)."""

    _new_row = _Row  # how PagedSteps makes a row

    def __init__(
        self,
        export_dir: str | Path,
        *,
        max_running: int = 16,
        max_queue: int = 64,
        token_budget: int = 256,
        cache: str = "auto",
        provider: str = "cpu",
        kv_budget: int | None = None,
        threads: int | None = None,
        record_logits: bool = False,
        prefix_sharing: bool = True,
    ) -> None:
        for name, value in (
            ("max_running", max_running),
            ("max_queue", max_queue),
            ("token_budget", token_budget),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if cache not in ("auto", "plain"):
            raise ValueError(f"cache must be 'auto' or 'plain' for the engine, got {cache!r}")
        if token_budget < max_running:
            raise ValueError(
                f"token_budget {token_budget} must be >= max_running {max_running}"
                " (every decoding row takes one token a step)"
            )
        self.model = ModelSession(export_dir, provider=provider, threads=threads)
        cfg = self.model.config
        directory = self.model.export_dir
        self.tokenizer = Tokenizer(directory) if (directory / "tokenizer.json").is_file() else None
        self.context_length = int(cfg.context_length or 2048)
        self.max_running, self.max_queue, self.token_budget = max_running, max_queue, token_budget
        self.kv_budget = int(kv_budget or max_running * self.context_length)
        if self.kv_budget < self.context_length:
            raise ValueError(
                f"kv_budget {self.kv_budget} must be >= the context of {self.context_length}"
                " cache slots (one request alone must always fit)"
            )
        metadata = self.model.session.get_modelmeta().custom_metadata_map
        # GroupQueryAttention rotates by cache slot: no holes inside a row (module docstring)
        self.slot_positions = (
            cfg.share_buffer
            or metadata.get(KV_BUFFER_KEY) == "shared"
            or metadata.get(CONTINUATION_KEY) == "one_token"
        )
        # slot positions: a new batch's time axis starts this long (masked) so that a prompt
        # of up to this many tokens can join it without waiting
        self.slot_headroom = min(64, self.context_length // 8)
        # slot positions on a graph that appends in place: one buffer per cache tensor,
        # rows bound in place (engine_slots); cache="plain" keeps NumPy rows through run()
        self._slots = (
            InPlaceSlots(self.model, max_running, self.context_length)
            if self.slot_positions
            and cache == "auto"
            and self.model.shares_kv_buffer
            and self.model.device == "cpu"  # host buffers bound in place
            else None
        )
        # which KV store runs: "in_place_slots" (engine_slots), "slots" (NumPy rows) or
        # "paged" (engine_paged: exports with graphattn.kv_layout=paged)
        self.kv_store = "in_place_slots" if self._slots else "slots"
        self._paged: PagedStore | None = None
        if self.model.kv_layout == "paged":
            self.slot_positions, self.kv_store = False, "paged"
            blocks = max(
                self.kv_budget // self.model.kv_block_size,
                math.ceil(self.context_length / self.model.kv_block_size),
            )
            self._paged = PagedStore(self.model, blocks, prefix_sharing=prefix_sharing)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._pasts: list[list[np.ndarray]] = []
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.record_logits = record_logits  # keep each sampled position's logits (tests)
        self._stats = {
            "tokens_generated": 0,
            "prompt_tokens": 0,
            "preemptions": 0,
            "compactions": 0,
            "steps": 0,
            "requests_finished": 0,
            "prefix_cached_tokens": 0,  # paged: prompt tokens taken from shared blocks
            "graph_calls": 0,  # paged: a step may split its decodes and prefills
            "mixed_calls": 0,
        }
        self._ttft: deque[float] = deque(maxlen=4096)  # the latest requests' TTFTs

    # ------------------------------------------------------------------ API
    def submit(self, prompt_ids: list[int], params: RequestParams | None = None) -> Request:
        """Queue a request; raises QueueFull, PromptTooLong, or ValueError for bad ids."""
        params = params or RequestParams()
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.context_length:
            raise PromptTooLong(
                f"prompt of {len(ids)} tokens leaves no room for a new token in the context"
                f" of {self.context_length}"
            )
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests (max_queue)")
            request = Request(self, f"req-{next(self._ids)}", ids, params)
            self._queue.append(request)
            self._wake.notify_all()
        return request

    def has_work(self) -> bool:
        """True while requests are queued or running."""
        with self._lock:
            return bool(self._queue or self._rows)

    def stats(self) -> dict:
        """Counters: queue_depth, running, tokens_generated, prompt_tokens, preemptions,
        steps, cache_rows, cache_slots (allocated), kv_budget, ttft_seconds (seconds from submit
        to first token of the latest 4096 requests) and requests_finished."""
        with self._lock:
            return {
                **self._stats,
                "queue_depth": len(self._queue),
                "running": len(self._rows),
                "cache_rows": self._cache_rows(),
                "cache_slots": self._cache_slots(),
                **(self._paged.pool.stats() if self._paged else {}),
                **({"batched_prefills": self._slots.batched_prefills} if self._slots else {}),
                "kv_budget": self.kv_budget,
                "kv_store": self.kv_store,
                "ttft_seconds": list(self._ttft),
            }

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Call :meth:`step` until nothing is queued or running (bounded by ``max_steps``)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError(f"still busy after {max_steps} steps")

    def start(self) -> None:
        """Run :meth:`step` on a background thread while there is work."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the engine is already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="graphattn-engine")
            self._thread.daemon = True
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the background thread; with ``drain`` after every queued and running request
        has finished, else cancelling them."""
        with self._lock:
            thread = self._thread
            if not drain:
                for request in [r.request for r in self._rows] + list(self._queue):
                    self._cancel(request)
            self._stopping = True
            self._wake.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the engine did not stop within {timeout} s")
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._queue or self._rows or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._queue or self._rows):
                    return
            try:
                self.step()
            except Exception as error:  # a failed step finishes its requests, not the thread
                with self._lock:
                    for request in [r.request for r in self._rows] + list(self._queue):
                        request.error = f"{type(error).__name__}: {error}"
                        self._remove(request)
                        request._finish("error")

    # ---------------------------------------------------------------- rows
    def _cache_rows(self) -> int:
        if self._paged:
            return len(self._rows)
        return self._slots.rows if self._slots else int(self._mask.shape[0])

    def _cache_slots(self) -> int:
        """Cache slots allocated (paged: in used blocks)."""
        if self._paged:
            return self._paged.pool.blocks_used * self._paged.block_size
        return self._cache_rows() * self._width()

    def _width(self) -> int:
        """The batch's time axis (cache slots per row)."""
        return self._slots.width if self._slots else int(self._mask.shape[1])

    def _cancel(self, request: Request) -> None:
        with self._lock:
            self._remove(request)
            request._finish("cancelled")

    def _remove(self, request: Request) -> None:
        """Take ``request`` out of the queue or the batch (its cache row deleted)."""
        if request in self._queue:
            self._queue.remove(request)
        for index, row in enumerate(self._rows):
            if row.request is request:
                if self._paged:  # its blocks are released at once, nothing else moves
                    self._paged.leave(row.paged)
                    del self._rows[index]
                    return
                if self._slots:  # the last row takes its place (engine_slots)
                    self._slots.remove_row(index)
                    self._rows[index] = self._rows[-1]
                    self._rows.pop()
                    return
                del self._rows[index]
                self._delete_row(index)
                return

    def _delete_row(self, index: int) -> None:
        layout = self.model.cache_layout
        self._mask = np.delete(self._mask, index, axis=0)
        if not self._rows:
            self._pasts, self._mask = [], np.zeros((0, 0), dtype=np.int64)
            return
        self._pasts = [
            [np.delete(a, index, axis=t.batch_axis) for t, a in zip(tensors, arrays)]
            for tensors, arrays in zip(layout, self._pasts)
        ]

    def _add_row(self, request: Request) -> _Row:
        """A new row of ``T`` masked slots (zeros) at the end of the batch."""
        row = _Row(request)
        width = self._mask.shape[1]
        layout = self.model.cache_layout
        if not self._rows:
            self._pasts = [
                [np.zeros(t.shape(1, width), dtype=t.dtype) for t in tensors] for tensors in layout
            ]
            self._mask = np.zeros((1, width), dtype=np.int64)
        else:
            self._pasts = [
                [
                    np.concatenate(
                        [a, np.zeros(t.shape(1, width), dtype=t.dtype)], axis=t.batch_axis
                    )
                    for t, a in zip(tensors, arrays)
                ]
                for tensors, arrays in zip(layout, self._pasts)
            ]
            self._mask = np.concatenate([self._mask, np.zeros((1, width), np.int64)])
        self._rows.append(row)
        return row

    def _compact(self) -> None:
        """Gather each row's cached tokens to the right end of a time axis as long as the
        longest row (order kept; positions are explicit, so attention is unchanged)."""
        counts = self._mask.sum(axis=1)
        width = int(counts.max()) if counts.size else 0
        gather = np.zeros((len(counts), width), dtype=np.int64)
        mask = np.zeros((len(counts), width), dtype=np.int64)
        for r, count in enumerate(counts):
            slots = np.flatnonzero(self._mask[r])
            gather[r, width - count :] = slots
            mask[r, width - count :] = 1
        pasts = []
        for tensors, arrays in zip(self.model.cache_layout, self._pasts):
            layer = []
            for t, a in zip(tensors, arrays):
                moved = np.moveaxis(a, (t.batch_axis, t.time_axis), (0, 1))
                taken = moved[np.arange(len(counts))[:, None], gather]
                layer.append(np.ascontiguousarray(np.moveaxis(taken, (0, 1), t.axes)))
            pasts.append(layer)
        self._pasts, self._mask = pasts, mask
        self._stats["compactions"] += 1

    def _held(self) -> int:
        """Cache slots the running rows hold (real tokens, plus the whole axis under
        slot positions where holes cannot be reclaimed)."""
        if self.slot_positions:
            return self._cache_rows() * self._width()
        return int(self._mask.sum())

    # ---------------------------------------------------------------- step
    def _admit(self) -> None:
        """Move queued requests (FIFO) into the batch while rows, memory and, for slot
        positions, the step's token budget (their prefill calls run now) allow."""
        if self._paged:
            self._admit_paged()
            return
        self._joins: list[tuple[int, list[int]]] = []  # in-place slots: (row, head) to prefill
        self._admit_rows()
        if self._slots and self._joins:
            self._slots.prefill_many(self._joins, CALL_COST)

    def _admit_rows(self) -> None:
        joined = 0  # slot positions: prompt tokens prefilled by this step's joins
        while self._queue and len(self._rows) < self.max_running:
            width = self._width()
            request = self._queue[0]
            need = len(request.prompt_ids) + len(request.token_ids)
            if self.slot_positions and joined and joined + need > self.token_budget:
                return
            joined += need
            rows = len(self._rows)
            if self.slot_positions:
                if rows and (
                    width < need - 1
                    or width + 1 + request.params.max_tokens - len(request.token_ids)
                    > self.context_length
                ):
                    return  # FIFO: the head waits until it can be aligned (docstring)
                after = (rows + 1) * ((width if rows else self._start_width(request)) + 1)
            else:
                after = self._held() + need + rows + 1
            if rows and after > self.kv_budget:
                return
            self._queue.popleft()
            if self.slot_positions:
                self._join_aligned(request)
            else:
                self._add_row(request)

    def _start_width(self, request: Request) -> int:
        """Slot positions: the time axis of a new batch that ``request`` starts (its tokens
        but the last, or the headroom where the request still ends within the context)."""
        head = len(request.prompt_ids) + len(request.token_ids) - 1
        remaining = request.params.max_tokens - len(request.token_ids)
        if self.slot_headroom + 1 + remaining <= self.context_length:
            return max(head, self.slot_headroom)
        return head

    def _join_aligned(self, request: Request) -> None:
        """Slot-position graphs: run the request's tokens but its last alone, over a masked
        zero past, so they end in the slot before the batch's next one."""
        tokens = list(request.prompt_ids) + list(request.token_ids)
        head = tokens[:-1]
        if self._slots:
            if not self._rows:
                self._slots.start(self._start_width(request))
            row = _Row(request)
            index = self._slots.add_row()
            self._rows.append(row)
            row.pending = tokens[-1:]
            self._joins.append((index, head))  # prefilled after the admissions (_admit)
            row.position = len(head)
            self._stats["prompt_tokens"] += len(head)
            return
        if not self._rows:
            self._mask = np.zeros((0, self._start_width(request)), dtype=np.int64)
        width = self._mask.shape[1]
        row = self._add_row(request)
        row.pending = tokens[-1:]
        if not head:
            return
        pad = width - len(head)
        layout = self.model.cache_layout
        pasts = [[np.zeros(t.shape(1, pad), dtype=t.dtype) for t in tensors] for tensors in layout]
        mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, len(head)), np.int64)], 1)
        ids = np.array([head], dtype=np.int64)
        _, presents = self._run(ids, mask, np.arange(len(head), dtype=np.int64)[None], pasts)
        index = len(self._rows) - 1
        for tensors, arrays, new in zip(layout, self._pasts, presents):
            for t, a, p in zip(tensors, arrays, new):
                np.moveaxis(a, t.batch_axis, 0)[index] = np.moveaxis(p, t.batch_axis, 0)[0]
        self._mask[index] = mask[0]
        row.position = len(head)
        self._stats["prompt_tokens"] += len(head)

    def _preempt(self, new_tokens: int) -> None:
        """Evict the youngest rows until this step's tokens fit in the KV budget."""
        while len(self._rows) > 1:
            grow = len(self._rows) if self.slot_positions else new_tokens  # one slot a row
            if self._held() + grow <= self.kv_budget:
                return
            row = max(self._rows, key=lambda r: r.order)
            self._remove(row.request)
            self._queue.appendleft(row.request)
            self._stats["preemptions"] += 1

    def _plan(self, cap: int | None = None) -> int:
        """Each row's chunk for this step (decoders 1, prefills share the rest FIFO, each at
        most ``cap`` and at most ``token_budget // rows``: the call computes rows × width
        positions, pads included); returns the step's width."""
        budget = self.token_budget - sum(1 for r in self._rows if len(r.pending) == 1)
        share = max(1, self.token_budget // len(self._rows))
        cap = min(cap, share) if cap else share
        for row in self._rows:
            if len(row.pending) == 1:
                row.chunk = 1
            else:
                row.chunk = max(0, min(len(row.pending), budget, cap or budget))
                budget -= row.chunk
        return max(r.chunk for r in self._rows)

    def step(self) -> None:
        """Admit what fits, then one batched graph call over every running row."""
        with self._lock:
            self._admit()
            if not self._rows:
                return
            if self._paged:
                self._step_paged()
                return
            width = self._plan()
            self._preempt(sum(r.chunk for r in self._rows))
            width = self._plan()
            if self._slots:  # every row decodes one token, in place
                logits = self._slots.decode([row.pending[0] for row in self._rows])
                self._after_call(logits)
                return
            batch, total = len(self._rows), self._mask.shape[1]
            if not self.slot_positions and total and self._mask.sum() * 2 < self._mask.size:
                self._compact()
                total = self._mask.shape[1]
            if not self.slot_positions and total + width > self.context_length:
                self._compact()  # the time axis stays within the context the graph knows
                total = self._mask.shape[1]
                if total + width > self.context_length:
                    width = self._plan(cap=self.context_length - total)
            pad = self.model.config.pad_token_id
            ids = np.full((batch, width), pad, dtype=np.int64)
            new_mask = np.zeros((batch, width), dtype=np.int64)
            pos = np.zeros((batch, width), dtype=np.int64)
            for r, row in enumerate(self._rows):
                n = row.chunk
                if n:
                    ids[r, width - n :] = row.pending[:n]
                    new_mask[r, width - n :] = 1
                    pos[r, width - n :] = np.arange(row.position, row.position + n)
            mask = np.concatenate([self._mask, new_mask], axis=1)
            logits, presents = self._run(ids, mask, pos, self._pasts)
            self._pasts, self._mask = presents, mask
            self._after_call(logits)

    def _after_call(self, logits: np.ndarray) -> None:
        """Advance every row by its chunk; sample the rows whose pending tokens are done."""
        self._stats["steps"] += 1
        finished = [
            row.request
            for r, row in enumerate(self._rows)
            if row.chunk and self._advance(row, logits[r, -1])
        ]
        for request in finished:
            self._remove(request)

    def _advance(self, row: _Row, logits_V: np.ndarray) -> bool:
        """Move ``row`` past the chunk it fed; once its pending tokens are all in the cache,
        sample its next token from ``logits_V [V]``. Returns whether its request finished."""
        n = row.chunk
        if len(row.pending) > 1 or not row.request.token_ids:  # a prompt (or recompute) chunk
            self._stats["prompt_tokens"] += n
        del row.pending[:n]
        row.position += n
        return not row.pending and self._sample(row, logits_V)

    def _run(self, ids, mask, pos, pasts):
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.model.has_position_ids:
            feeds["position_ids"] = pos
        if self.model.has_segment_ids:
            feeds["segment_ids"] = mask
        layout = self.model.cache_layout
        for tensors, arrays in zip(layout, pasts):
            for t, a in zip(tensors, arrays):
                feeds[t.past] = a
        outputs = dict(zip(self.model.output_names, self.model.session.run(None, feeds)))
        presents = [[outputs[t.present] for t in tensors] for tensors in layout]
        return outputs["logits"], presents

    def _sample(self, row: _Row, logits_V: np.ndarray) -> bool:
        """Pick the row's next token, stream it; returns whether the request finished."""
        request = row.request
        if self.record_logits:
            request.logits.append(np.array(logits_V, dtype=np.float32))
        history = np.array(request.prompt_ids + request.token_ids, dtype=np.int64)
        token = int(request.sampler(logits_V[None], [history])[0])
        request.token_ids.append(token)
        self._stats["tokens_generated"] += 1
        if len(request.token_ids) == 1:
            self._ttft.append(time.perf_counter() - request.submitted)
        reason = "stop" if token in request.stop_ids else None
        text = request.text
        if reason is None and request.decoder is not None:
            text = self.tokenizer.decode(request.token_ids)
            cut = _find_stop(text, request.params.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
        if reason is None and len(request.token_ids) >= request.params.max_tokens:
            reason = "length"
        if reason is None and len(history) + 1 >= self.context_length:
            reason = "length"
        piece = ""
        if request.decoder is not None:
            request.text = text
            safe = text if reason else text[: len(text) - _held_back(text, request.params.stop)]
            if not reason and safe.endswith("\ufffd"):
                safe = safe[:-1]
            if safe.startswith(request.emitted):
                piece, request.emitted = safe[len(request.emitted) :], safe
        request._emit(token, piece)
        if reason:
            request._finish(reason)
            self._stats["requests_finished"] += 1
            return True
        row.pending = [token]
        return False


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[len(text) - size :]):
                longest = size
                break
    return longest
