"""KV caches that drive a decoder step by step. Both keep ``length`` tokens of history and
refuse, before running, a step that would pass ``capacity``.

Each layer caches the tensors its graph inputs say (:mod:`graphattn.runtime.cache_layout`):
``key``/``value [B, Hkv, T, D]`` for ordinary attention, ``latent [B, T, kv_lora_rank]`` and
``rope_key [B, T, rope_dim]`` for latent attention, or any other ``past_key_values.{i}.<name>``
with one ``past_sequence_length`` axis; below, "per tensor" means each of those.

- :class:`PlainCache`: ``session.run`` with NumPy arrays, feeding each step's presents back
  as the next pasts (the baseline every ONNX app can write).
- :class:`BoundCache`: IOBinding over buffers preallocated once per layer at ``capacity``
  on the session's device (CUDA memory under the CUDA provider), so the cache never comes back
  to the host and no step allocates. Our graphs build each present with a Concat of past and
  new, which cannot write into its own input, so every layer has two buffers per tensor
  used in turn: step t reads its past from one and writes its present into the other.
- :class:`SharedCache`: for graphs whose attention writes the new keys into its past buffer
  (GroupQueryAttention, ``past_present_share_buffer`` in ``genai_config.json``): one
  ``[B, Hkv, capacity, D]`` buffer per key/value and layer, bound as both past and present, so
  a step copies nothing but its own new keys. Only for graphs whose every cache tensor is an
  ordinary key/value (a latent cache is never appended in place).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from graphattn.runtime.session import ModelSession


class ContextLengthError(ValueError):
    """A step would make the cache longer than its capacity."""


class _Cache:
    def __init__(self, model: ModelSession, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        self.model, self.capacity = model, int(capacity)
        self.length = 0
        self.batch = 0
        # segment_ids [B, T] for the next steps of a graph that takes them (packed
        # prefill); None: one document per row, segment_ids = attention_mask
        self.segment_ids: np.ndarray | None = None

    def _check(self, new_tokens: int) -> None:
        if self.length + new_tokens > self.capacity:
            raise ContextLengthError(
                f"{self.length} cached + {new_tokens} new tokens exceed the context of"
                f" {self.capacity} tokens"
            )

    def step(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """Run new tokens ``[B, S]``; returns logits ``[B, S, V]`` (``[B, 1, V]`` from a
        last-logits graph) and extends the cache.

        A graph that cannot take several rows continuing with several tokens after a past in
        one call (``one_token_continuation``) gets them one token per call: the same attention
        over the same keys, so the result is exact."""
        batch, new = input_ids.shape
        if not (self.model.one_token_continuation and batch > 1 and new > 1 and self.length):
            return self._run(input_ids, attention_mask, position_ids)
        self._check(new)
        total = attention_mask.shape[1]
        pieces = [
            self._run(
                input_ids[:, t : t + 1],
                attention_mask[:, : total - new + t + 1],
                None if position_ids is None else position_ids[:, t : t + 1],
            )
            for t in range(new)
        ]
        return pieces[-1] if self.model.last_logits_only else np.concatenate(pieces, axis=1)

    def _feeds(self, input_ids, attention_mask, position_ids) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.model.has_position_ids:
            feeds["position_ids"] = position_ids
        if self.model.has_segment_ids:
            segments = attention_mask if self.segment_ids is None else self.segment_ids
            if segments.shape != attention_mask.shape:
                raise ValueError(
                    f"segment_ids {segments.shape} must have the shape of attention_mask"
                    f" {attention_mask.shape}"
                )
            feeds["segment_ids"] = segments
        return feeds

    def _check_loaded(self, pasts: list[tuple[np.ndarray, ...]], length: int) -> None:
        layout = self.model.cache_layout
        if len(pasts) != len(layout):
            raise ValueError(f"load: {len(pasts)} layers given, the graph has {len(layout)}")
        batch = pasts[0][0].shape[layout[0][0].batch_axis]
        for tensors, arrays in zip(layout, pasts):
            for t, array in zip(tensors, arrays, strict=True):
                if tuple(array.shape) != tuple(t.shape(batch, length)):
                    raise ValueError(
                        f"load: {t.past} has shape {array.shape}, expected"
                        f" {tuple(t.shape(batch, length))}"
                    )
        if length > self.capacity:
            raise ContextLengthError(
                f"{length} cached tokens exceed the context of {self.capacity} tokens"
            )

    def _allocate(self, batch: int, copies: int) -> None:
        """``[layer][copy][tensor]`` OrtValues of each cache tensor's shape at ``capacity``
        tokens on the session's device (reused while the batch size stays the same)."""
        if self.batch != batch or not hasattr(self, "buffers"):
            device, capacity = self.model.device, self.capacity
            self.buffers = [
                [
                    [
                        ort.OrtValue.ortvalue_from_shape_and_type(
                            list(t.shape(batch, capacity)), t.dtype, device, 0
                        )
                        for t in tensors
                    ]
                    for _ in range(copies)
                ]
                for tensors in self.model.cache_layout
            ]

    def _bind_tokens(self, input_ids, attention_mask, position_ids):
        """(Re)bind this step's token inputs and the host logits output; returns the binding
        (a name bound again replaces its previous binding)."""
        io = self.binding
        for name, array in self._feeds(input_ids, attention_mask, position_ids).items():
            io.bind_cpu_input(name, np.ascontiguousarray(array))
        io.bind_output("logits", "cpu")
        return io


class PlainCache(_Cache):
    """History as NumPy arrays passed through ``session.run``."""

    name = "plain"

    def reset(self, batch: int) -> None:
        """Empty the cache for a new batch of ``batch`` rows: zero-length tensors per layer."""
        self.pasts = [
            tuple(np.zeros(t.shape(batch, 0), dtype=t.dtype) for t in tensors)
            for tensors in self.model.cache_layout
        ]
        self.length, self.batch = 0, batch

    def _run(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """One graph call over new tokens ``[B, S]``; returns its logits, extends the cache."""
        self._check(input_ids.shape[1])
        feeds = self._feeds(input_ids, attention_mask, position_ids)
        layout = self.model.cache_layout
        for tensors, arrays in zip(layout, self.pasts):
            for tensor, array in zip(tensors, arrays):
                feeds[tensor.past] = array
        outputs = dict(zip(self.model.output_names, self.model.session.run(None, feeds)))
        self.pasts = [tuple(outputs[t.present] for t in tensors) for tensors in layout]
        self.length += input_ids.shape[1]
        return outputs["logits"]

    def layers(self) -> list[tuple[np.ndarray, ...]]:
        """Per layer, the cached tensors (cache order, ``[.., length, ..]``)."""
        return list(self.pasts)

    def load(self, pasts: list[tuple[np.ndarray, ...]], length: int) -> None:
        """Replace the cache by ``pasts`` (per layer, tensors in cache order, each of
        :meth:`CacheTensor.shape` ``(batch, length)``)."""
        self._check_loaded(pasts, length)
        self.pasts = [tuple(np.ascontiguousarray(a) for a in arrays) for arrays in pasts]
        self.length = length
        self.batch = pasts[0][0].shape[self.model.cache_layout[0][0].batch_axis]


class BoundCache(_Cache):
    """Preallocated per-layer buffers on the session's device, bound through IOBinding."""

    name = "bound"

    def reset(self, batch: int) -> None:
        """Allocate (or reuse) two buffers per cache tensor and layer, each the tensor's
        shape at ``capacity`` tokens."""
        self._allocate(batch, copies=2)
        self.binding = self.model.session.io_binding()
        self.turn, self.length, self.batch = 0, 0, batch
        # per layer and tensor: (past name, present name, dtype, index into _layouts), so a
        # step computes each distinct shape once
        layouts: dict[tuple, int] = {}
        self._layouts: list = []
        self._plan = []
        for tensors in self.model.cache_layout:
            steps = []
            for t in tensors:
                key = (t.dims, t.batch_axis, t.time_axis)
                if key not in layouts:
                    layouts[key] = len(self._layouts)
                    self._layouts.append(t)
                steps.append((t.past, t.present, t.dtype, layouts[key]))
            self._plan.append(steps)

    def _run(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """One graph call over new tokens ``[B, S]``; returns its logits, extends the cache.
        A past of ``length`` tokens is read, contiguous, from the start of one buffer; the
        present is written, contiguous, from the start of the other."""
        self._check(input_ids.shape[1])
        device = self.model.device
        batch, new = input_ids.shape
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        io = self._bind_tokens(input_ids, attention_mask, position_ids)
        length = self.length
        shapes = [  # per distinct layout: (past shape, present shape)
            (list(t.shape(batch, length)), list(t.shape(batch, length + new)))
            for t in self._layouts
        ]
        for steps, buffers in zip(self._plan, self.buffers):
            read, write = buffers[self.turn], buffers[1 - self.turn]
            for part, (past, present, dtype, which) in enumerate(steps):
                past_shape, present_shape = shapes[which]
                io.bind_input(past, device, 0, dtype, past_shape, read[part].data_ptr())
                io.bind_output(present, device, 0, dtype, present_shape, write[part].data_ptr())
        self.model.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        self.turn, self.length = 1 - self.turn, self.length + new
        return logits

    def layers(self) -> list[tuple[np.ndarray, ...]]:
        """Per layer, the cached tensors as host arrays (see :meth:`layer`)."""
        return [self.layer(i) for i in range(len(self.buffers))]

    def load(self, pasts: list[tuple[np.ndarray, ...]], length: int) -> None:
        """Reset to ``pasts``' batch and copy them (per layer, tensors in cache order, each
        of :meth:`CacheTensor.shape` ``(batch, length)``) into the start of the buffers the
        next step reads."""
        self._check_loaded(pasts, length)
        self.reset(pasts[0][0].shape[self.model.cache_layout[0][0].batch_axis])
        for arrays, buffers in zip(pasts, self.buffers):
            for array, buffer in zip(arrays, buffers[self.turn]):
                host = np.zeros(buffer.shape(), dtype=array.dtype)
                host.reshape(-1)[: array.size] = array.reshape(-1)
                buffer.update_inplace(host)
        self.length = length

    def layer(self, index: int) -> tuple[np.ndarray, ...]:
        """The cached tensors of one layer as host arrays, in cache order ((key, value) for
        ordinary attention; for tests and debugging): the present last written, each of
        shape ``[.., length, ..]`` at its buffer's start."""
        arrays = []
        for t, buffer in zip(self.model.cache_layout[index], self.buffers[index][self.turn]):
            shape = t.shape(self.batch, self.length)
            count = int(np.prod(shape))
            arrays.append(buffer.numpy().reshape(-1)[:count].reshape(shape))
        return tuple(arrays)


class SharedCache(_Cache):
    """One buffer per key/value and layer, bound as both past and present (the graph's
    attention appends in place at each row's ``seqlens_k``)."""

    name = "shared"

    def reset(self, batch: int) -> None:
        """Allocate (or reuse) one ``[batch, kv_heads, capacity, head_dim]`` buffer per
        key/value and layer."""
        if not all(t.is_kv for tensors in self.model.cache_layout for t in tensors):
            raise ValueError(
                f"{self.model.config.model_path}: the shared cache needs ordinary"
                " [batch, kv_heads, T, head_dim] key/value caches appended in place"
                " (GroupQueryAttention); this graph caches other tensors: use bound or plain"
            )
        self._allocate(batch, copies=1)
        self.binding = io = self.model.session.io_binding()
        # the cache bindings never change: bound once here, each step rebinds only its tokens
        # (and logits, bound first so that it stays output 0)
        io.bind_output("logits", "cpu")
        for tensors, (buffers,) in zip(self.model.cache_layout, self.buffers):
            for t, buffer in zip(tensors, buffers):
                io.bind_ortvalue_input(t.past, buffer)
                io.bind_ortvalue_output(t.present, buffer)
        self.length, self.batch = 0, batch

    def _run(self, input_ids, attention_mask, position_ids) -> np.ndarray:
        """One graph call over new tokens ``[B, S]``; returns its logits, extends the cache."""
        self._check(input_ids.shape[1])
        io = self._bind_tokens(input_ids, attention_mask, position_ids)
        self.model.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()
        self.length += input_ids.shape[1]
        return logits

    def layer(self, index: int) -> tuple[np.ndarray, ...]:
        """The cached key and value of one layer as host arrays (for tests and debugging): the
        first ``length`` slots of its ``[batch, kv_heads, capacity, head_dim]`` buffers."""
        return tuple(b.numpy()[:, :, : self.length] for b in self.buffers[index][0])


CACHES = {"bound": BoundCache, "plain": PlainCache, "shared": SharedCache}
