"""The engine's paged KV store, for exports with metadata ``graphattn.kv_layout=paged``.

Per layer and key/value one pool ``[num_blocks, kv_heads, block_size, head_dim]`` (host
NumPy, handed to every call as the graph's ``past_key_values.*`` input without a copy); per
running sequence a list of block ids (its block table, :mod:`graphattn.runtime.block_pool`
counts the references). One call runs any mix of rows: row b brings ``query_lengths[b] >= 1``
new tokens (a prompt chunk or one decode token), left-padded to the call's widest, after its
``past_lengths[b]`` tokens already in the pool; the graph reads the pool through
``block_table`` and returns only the new tokens' K/V (``present.*  [B, Hkv, S, D]``), which
are written here into each row's blocks (slot ``j`` of a row is slot ``j % bs`` of its block
``j // bs``). Nothing in the pool moves when a sequence joins or leaves.

Prefix sharing: a block that fills up is keyed by (the previous block's key, its tokens);
a joining sequence whose leading full blocks have the same keys takes those blocks (one more
reference each) and skips their prefill. At least its last token is always computed (its
logits are the first sample).
"""

from __future__ import annotations

import math

import numpy as np

from graphattn.runtime.block_pool import BlockPool, PoolExhausted
from graphattn.runtime.session import ModelSession

# what one more graph call costs, in token positions computed (every weight read once more):
# a paged step splits its decodes from its prefill chunks when padding costs more; the
# in-place slot store batches a step's joins when that costs less
CALL_COST = 16


class PagedRow:
    """A sequence's place in the pool: its blocks and their prefix keys so far."""

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.keys: list[tuple] = []  # prefix key of each leading full block


class PagedStore:
    """The pools and the block allocator of one engine (see the module docstring)."""

    def __init__(self, model: ModelSession, num_blocks: int, prefix_sharing: bool = True):
        if not model.kv_block_size:
            raise ValueError(f"{model.config.model_path}: no graphattn.kv_block_size metadata")
        self.model, self.prefix_sharing = model, prefix_sharing
        self.block_size = bs = model.kv_block_size
        self.pool = BlockPool(num_blocks, bs)
        self.pools = [
            [np.zeros(t.shape(num_blocks, bs), dtype=t.dtype) for t in tensors]
            for tensors in model.cache_layout
        ]

    # ------------------------------------------------------------ blocks
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def join(self, tokens: list[int]) -> tuple[PagedRow, int] | None:
        """A row for a sequence of ``tokens`` with blocks for all of them: shared prefix
        blocks first, new ones after; returns (row, tokens already cached) or None (and
        nothing held) when the free blocks do not suffice."""
        row, bs = PagedRow(), self.block_size
        if self.prefix_sharing:
            for k in range((len(tokens) - 1) // bs):
                key = (row.keys[-1] if row.keys else None, tuple(tokens[k * bs : (k + 1) * bs]))
                block = self.pool.lookup(key)
                if block is None:
                    break
                row.blocks.append(block)
                row.keys.append(key)
        if self.blocks_for(len(tokens)) - len(row.blocks) > self.pool.blocks_free:
            self.leave(row)
            return None
        self.grow(row, len(tokens))
        return row, len(row.keys) * bs

    def grow(self, row: PagedRow, tokens: int) -> None:
        """Blocks for ``tokens`` slots in ``row``; raises PoolExhausted (keeping what it took)."""
        while len(row.blocks) * self.block_size < tokens:
            row.blocks.append(self.pool.allocate())

    def leave(self, row: PagedRow) -> None:
        """Release every block of ``row`` at once."""
        for block in row.blocks:
            self.pool.release(block)
        row.blocks, row.keys = [], []

    # ------------------------------------------------------------ the call
    def run(self, rows: list[tuple[PagedRow, int, list[int]]], pad: int) -> np.ndarray:
        """One graph call over ``rows`` = (row, tokens cached, new tokens); writes the new
        K/V into the pool; returns logits ``[len(rows), 1 or S, V]``."""
        bs = self.block_size
        batch, width = len(rows), max(len(new) for _, _, new in rows)
        ids = np.full((batch, width), pad, dtype=np.int64)
        positions = np.zeros((batch, width), dtype=np.int64)
        span = max(1, max(self.blocks_for(past) for _, past, _ in rows))
        table = np.zeros((batch, span), dtype=np.int64)
        past_lengths = np.array([past for _, past, _ in rows], dtype=np.int64)
        query_lengths = np.array([len(new) for _, _, new in rows], dtype=np.int64)
        rows_idx, cols_idx, blocks_idx, slots_idx = [], [], [], []
        for b, (row, past, new) in enumerate(rows):
            n = len(new)
            ids[b, width - n :] = new
            positions[b, width - n :] = np.arange(past, past + n)
            used = row.blocks[: self.blocks_for(past)]
            table[b, : len(used)] = used
            slots = np.arange(past, past + n)
            rows_idx.append(np.full(n, b))
            cols_idx.append(np.arange(width - n, width))
            blocks_idx.append(np.asarray(row.blocks, dtype=np.int64)[slots // bs])
            slots_idx.append(slots % bs)
        feeds = {
            "input_ids": ids,
            "position_ids": positions,
            "block_table": table,
            "past_lengths": past_lengths,
            "query_lengths": query_lengths,
        }
        layout = self.model.cache_layout
        for tensors, arrays in zip(layout, self.pools):
            for t, a in zip(tensors, arrays):
                feeds[t.past] = a
        outputs = dict(zip(self.model.output_names, self.model.session.run(None, feeds)))
        r, c = np.concatenate(rows_idx), np.concatenate(cols_idx)
        blocks, slots = np.concatenate(blocks_idx), np.concatenate(slots_idx)
        for tensors, arrays in zip(layout, self.pools):
            for t, a in zip(tensors, arrays):
                a[blocks, :, slots, :] = outputs[t.present][r, :, c, :]
        return outputs["logits"]

    def register(self, row: PagedRow, tokens: list[int], cached: int) -> None:
        """Key the row's blocks that are full now (``cached`` of ``tokens`` in the pool)."""
        if not self.prefix_sharing:
            return
        bs = self.block_size
        for k in range(len(row.keys), cached // bs):
            key = (row.keys[-1] if row.keys else None, tuple(tokens[k * bs : (k + 1) * bs]))
            self.pool.register(row.blocks[k], key)
            row.keys.append(key)


class PagedSteps:
    """The engine's admission and steps over a :class:`PagedStore` (mixed into
    :class:`graphattn.runtime.engine.Engine`, whose rows, queue, stats and sampling they use)."""

    def _admit_paged(self) -> None:
        """FIFO while rows and free blocks allow: blocks for every token of the head's
        prompt (and generated tokens, after a preemption) are taken at once, shared prefix
        blocks first (their tokens are not computed again)."""
        while self._queue and len(self._rows) < self.max_running:
            request = self._queue[0]
            tokens = list(request.prompt_ids) + list(request.token_ids)
            joined = self._paged.join(tokens)
            if joined is None:
                return
            self._queue.popleft()
            row = self._new_row(request)
            row.paged, cached = joined
            row.position, row.pending = cached, tokens[cached:]
            self._stats["prefix_cached_tokens"] += cached
            self._rows.append(row)

    def _step_paged(self) -> None:
        """Every row with a chunk this step runs (decodes one token, prefills a chunk of the
        ``token_budget`` left after the decodes, FIFO); a row crossing a block boundary takes
        a new block, preempting the youngest rows (recompute, requeued at the front) while none
        is free. Decodes and prefill chunks share one call unless padding every decode to the
        widest chunk costs more than a second call (:data:`CALL_COST`)."""
        decoding = [r for r in self._rows if len(r.pending) == 1]
        prefilling = [r for r in self._rows if len(r.pending) > 1]
        budget = self.token_budget - len(decoding)
        cap = max(1, budget // max(1, len(prefilling)))
        for row in decoding:
            row.chunk = 1
        for row in prefilling:
            row.chunk = max(0, min(len(row.pending), budget, cap))
            budget -= row.chunk
        for row in sorted(self._rows, key=lambda r: r.order):
            while row in self._rows:
                try:
                    self._paged.grow(row.paged, row.position + row.chunk)
                    break
                except PoolExhausted:
                    victim = max(self._rows, key=lambda r: r.order)
                    self._remove(victim.request)
                    self._queue.appendleft(victim.request)
                    self._stats["preemptions"] += 1
        called = [row for row in self._rows if row.chunk]
        if not called:
            return
        decoding = [r for r in called if r.chunk == 1]
        prefilling = [r for r in called if r.chunk > 1]
        widest = max(r.chunk for r in called)
        split = len(decoding) + len(prefilling) * widest + CALL_COST
        groups = [called]
        if decoding and prefilling and len(called) * widest > split:
            groups = [decoding, prefilling]
        self._stats["steps"] += 1
        finished = []
        for group in groups:
            finished += self._call_paged(group)
        for request in finished:
            self._remove(request)

    def _call_paged(self, called: list) -> list:
        """One paged graph call over ``called``; returns the requests that finished."""
        work = [(row.paged, row.position, row.pending[: row.chunk]) for row in called]
        logits = self._paged.run(work, self.model.config.pad_token_id or 0)
        self._stats["graph_calls"] += 1
        if len({row.chunk == 1 for row in called}) == 2:
            self._stats["mixed_calls"] += 1  # prefill chunks and decodes in one call
        finished = []
        for i, row in enumerate(called):
            if self._advance(row, logits[i, -1]):
                finished.append(row.request)
            # key the blocks filled now (a token just sampled is past row.position: not keyed)
            tokens = row.request.prompt_ids + row.request.token_ids
            self._paged.register(row.paged, tokens, row.position)
        return finished


__all__ = ["CALL_COST", "PagedRow", "PagedSteps", "PagedStore", "PoolExhausted"]
