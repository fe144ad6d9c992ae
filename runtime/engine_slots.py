"""The engine's in-place slot store for graphs whose attention appends into its past buffer
(onnxruntime's GroupQueryAttention, model metadata ``graphattn.kv_buffer=shared``).

One host buffer per cache tensor and layer, ``[max_rows, kv_heads, capacity, head_dim]``,
bound through IOBinding as both past and present, so a step copies nothing but the new
tokens' keys (the kernel writes them in place). The running rows are buffer rows
``0 .. rows-1``: a batched call binds the contiguous view ``buffer[:rows]``, a joining row's
prefill is a batch-1 call bound to ``buffer[r:r+1]``, and a leaving row is replaced by the
last row (one row copy), so no call ever concatenates or deletes along the batch axis.

Why the rows share one time axis of ``width`` slots (right-aligned, masked at the front):
our GroupQueryAttention graphs derive ``seqlens_k`` from the *shape* of ``attention_mask``
(``seqlens_k[b] = width - 1`` for every row; the mask's zeros only become the padding
bias), and the kernel writes a row's new keys at slot ``seqlens_k[b] - new + 1`` and rotates
them by that slot. So every row's next token goes to the same slot ``width``, and a row
whose tokens end earlier has masked slots before its first token (a constant slot offset for
all of its tokens, which RoPE does not see). Holes inside a row would shift its positions,
so there are none: a joining row's prompt is prefilled alone so that it ends at slot
``width - 1``. ``capacity`` grows by doubling (one copy of the live slots) up to the
graph's context; the axis restarts at the next join once the batch is empty.
"""

from __future__ import annotations

import numpy as np

from graphattn.runtime.session import ModelSession


class InPlaceSlots:
    """Per-slot KV rows for a shared-buffer graph (see the module docstring)."""

    def __init__(self, model: ModelSession, max_rows: int, context: int) -> None:
        if not model.shares_kv_buffer:
            raise ValueError(f"{model.config.model_path}: the graph does not append in place")
        self.model, self.max_rows, self.context = model, max_rows, context
        self.rows = 0
        self.width = 0  # the shared time axis: slots 0..width-1 of every row are in use
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.capacity = 0
        self.buffers: list[list[np.ndarray]] = []
        self.binding = model.session.io_binding()
        self._bound: tuple | None = None  # (first row, rows, capacity, buffers) bound now
        self.batched_prefills = 0  # calls that prefilled several joining rows at once

    # ------------------------------------------------------------ memory
    def _ensure(self, slots: int) -> None:
        """Capacity for ``slots`` slots per row (doubling, at most the context)."""
        if slots <= self.capacity:
            return
        if slots > self.context:
            raise ValueError(f"{slots} slots exceed the context of {self.context}")
        capacity = max(64, self.capacity)
        while capacity < slots:
            capacity *= 2
        capacity = min(capacity, self.context)
        layout = self.model.cache_layout
        grown = [
            [np.zeros(t.shape(self.max_rows, capacity), dtype=t.dtype) for t in tensors]
            for tensors in layout
        ]
        for old, new in zip(self.buffers, grown):
            for a, b in zip(old, new):
                b[: self.rows, :, : self.width] = a[: self.rows, :, : self.width]
        self.buffers, self.capacity = grown, capacity

    def start(self, width: int) -> None:
        """An empty batch whose time axis starts ``width`` slots long (all masked)."""
        assert self.rows == 0
        self._ensure(max(width, 1))
        self.width = width
        self.mask = np.zeros((0, width), dtype=np.int64)

    def add_row(self) -> int:
        """A new row of ``width`` masked slots after the others; returns its index."""
        if self.rows >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are in use")
        self.mask = np.concatenate([self.mask, np.zeros((1, self.width), np.int64)])
        self.rows += 1
        return self.rows - 1

    def remove_row(self, index: int) -> None:
        """Free row ``index``: the last row moves into its place (one row copy)."""
        last = self.rows - 1
        if index != last:
            for arrays in self.buffers:
                for a in arrays:
                    a[index, :, : self.width] = a[last, :, : self.width]
            self.mask[index] = self.mask[last]
        self.mask = self.mask[:last]
        self.rows = last
        if not self.rows:
            self.width = 0
            self.mask = np.zeros((0, 0), dtype=np.int64)

    # ------------------------------------------------------------ calls
    def _call(self, ids: np.ndarray, mask: np.ndarray, first: int) -> np.ndarray:
        """One graph call over rows ``first .. first+len(ids)-1`` bound in place. The cache
        bindings are redone only when the rows or the capacity change (a name bound again
        replaces its binding; logits, bound first, stays output 0)."""
        batch = ids.shape[0]
        io = self.binding
        key = (first, batch, self.capacity, id(self.buffers))
        if key != self._bound:
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            io.bind_output("logits", "cpu")
            for tensors, arrays in zip(self.model.cache_layout, self.buffers):
                for t, a in zip(tensors, arrays):
                    view = a[first : first + batch]
                    shape, pointer = list(view.shape), view.ctypes.data
                    io.bind_input(t.past, "cpu", 0, t.dtype, shape, pointer)
                    io.bind_output(t.present, "cpu", 0, t.dtype, shape, pointer)
            self._bound = key
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if self.model.has_position_ids:  # not read by GroupQueryAttention graphs
            io.bind_cpu_input("position_ids", np.zeros(ids.shape, dtype=np.int64))
        io.bind_output("logits", "cpu")
        self.model.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()

    def prefill(self, index: int, tokens: list[int]) -> None:
        """Run ``tokens`` alone in row ``index`` so that they end at slot ``width - 1``."""
        count = len(tokens)
        if not count:
            return
        self._ensure(self.width)
        mask = np.zeros((1, self.width), dtype=np.int64)
        mask[0, self.width - count :] = 1
        self._call(np.array([tokens], dtype=np.int64), mask, index)
        self.mask[index] = mask[0]

    def prefill_many(self, joins: list[tuple[int, list[int]]], call_cost: int) -> None:
        """Prefill each (row, tokens) of this step's joins (rows consecutive, in order) so
        that they end at slot ``width - 1``: one batched call (every row computes all
        ``width`` positions, left-padded: the kernel's first-prompt case, past ignored) where
        that costs less than a call per row (``call_cost`` token positions a call), else
        :meth:`prefill` per row."""
        rows = [index for index, _ in joins]
        real = sum(len(tokens) for _, tokens in joins)
        batched = len(joins) * self.width
        if (
            len(joins) == 1
            or rows != list(range(rows[0], rows[0] + len(rows)))
            or (batched > real + call_cost * (len(joins) - 1))
        ):
            for index, tokens in joins:
                self.prefill(index, tokens)
            return
        pad = self.model.config.pad_token_id or 0
        ids = np.full((len(joins), self.width), pad, dtype=np.int64)
        mask = np.zeros((len(joins), self.width), dtype=np.int64)
        for i, (_, tokens) in enumerate(joins):
            if tokens:
                ids[i, self.width - len(tokens) :] = tokens
                mask[i, self.width - len(tokens) :] = 1
        self._call(ids, mask, rows[0])
        self.mask[rows[0] : rows[0] + len(rows)] = mask
        self.batched_prefills += 1

    def decode(self, tokens: list[int]) -> np.ndarray:
        """Every row adds one token (at slot ``width``); returns logits ``[rows, 1, V]``."""
        self._ensure(self.width + 1)
        mask = np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], axis=1)
        logits = self._call(np.array(tokens, dtype=np.int64)[:, None], mask, 0)
        self.mask, self.width = mask, self.width + 1
        return logits
