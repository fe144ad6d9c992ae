"""Each layer's cache tensors, read from a decoder graph's own inputs.

A decoder's cache is whatever ``past_key_values.{i}.<name>`` inputs its graph has, each
returned as the output ``present.{i}.<name>``: ordinary attention caches ``key`` and
``value [batch_size, kv_heads, past_sequence_length, head_dim]``, multi-head latent attention
caches ``latent [batch_size, past_sequence_length, kv_lora_rank]`` and ``rope_key
[batch_size, past_sequence_length, qk_rope_head_dim]``. The axis whose symbolic dim is
``past_sequence_length`` is time, ``batch_size`` is batch; every other dim must be a number
(or, for a 4-D key/value whose head dims are symbolic, come from the config). Layers may
differ in names, ranks and time axes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BATCH = "batch_size"
PAST = "past_sequence_length"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_PAST_NAME = re.compile(r"^past_key_values\.(\d+)\.(.+)$")


class CacheLayoutError(ValueError):
    """The graph's cache inputs/outputs cannot be read as per-layer cache tensors."""


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor of one layer: graph input ``past``, output ``present``, ``dims``
    (numbers, ``None`` at the batch and time axes), ``dtype``."""

    layer: int
    name: str
    past: str
    present: str
    dims: tuple[int | None, ...]
    batch_axis: int
    time_axis: int
    dtype: type

    def shape(self, batch: int, length: int) -> tuple[int, ...]:
        """The tensor's shape for ``batch`` rows of ``length`` tokens."""
        shape = list(self.dims)
        shape[self.batch_axis], shape[self.time_axis] = batch, length
        return tuple(int(d) for d in shape)

    @property
    def values_per_token(self) -> int:
        """Cached values per token per row (product of the dims other than batch and time)."""
        return int(np.prod([d for i, d in enumerate(self.dims) if i not in self.axes]))

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes per token per row."""
        return self.values_per_token * np.dtype(self.dtype).itemsize

    @property
    def axes(self) -> tuple[int, int]:
        """(batch axis, time axis)."""
        return self.batch_axis, self.time_axis

    @property
    def is_kv(self) -> bool:
        """An ordinary ``[batch, heads, time, head_dim]`` key or value."""
        return len(self.dims) == 4 and self.axes == (0, 2) and self.name in ("key", "value")


LayerCache = tuple[CacheTensor, ...]


def _numpy_dtype(onnx_type: str) -> type:
    """np.float16 / np.float32 for ``tensor(float16)`` / ``tensor(float)`` (as the runtime
    always read cache types)."""
    return np.float16 if "float16" in onnx_type else np.float32


def _axis(shape: Sequence[int | str | None], dim: str, fallback: int | None) -> int | None:
    named = [i for i, d in enumerate(shape) if d == dim]
    if len(named) > 1:
        return None
    return named[0] if named else fallback


def read_layout(
    inputs: Sequence,
    outputs: Sequence,
    *,
    where: str = "model",
    key_names: tuple[str, str] | None = None,
    present_names: tuple[str, str] | None = None,
    head_dims: tuple[int, int] | None = None,
) -> list[LayerCache]:
    """Per layer, its cache tensors in graph-input order, from a session's (or any objects
    with ``name``, ``shape``, ``type``) ``inputs``/``outputs``.

    ``key_names``/``present_names``: ``%d`` patterns of a config's key/value inputs and
    outputs when they are not ``past_key_values.%d.key|value`` (the tensors are then named
    ``key``/``value``). ``head_dims``: (kv_heads, head_dim) for 4-D key/value inputs whose head
    dims are symbolic. Raises :class:`CacheLayoutError` naming the tensor that does not fit."""
    output_names = {o.name for o in outputs}
    custom = {}
    if key_names is not None and present_names is not None:
        for part, pattern, present in zip(("key", "value"), key_names, present_names):
            if pattern != f"{PAST_PREFIX}%d.{part}":
                custom[pattern] = (part, present)
    found: dict[int, list[CacheTensor]] = {}
    for value in inputs:
        match = _PAST_NAME.match(value.name)
        layer = name = present = None
        if match:
            layer, name = int(match.group(1)), match.group(2)
            present = f"{PRESENT_PREFIX}{layer}.{name}"
        for pattern, (part, present_pattern) in custom.items():
            custom_match = re.fullmatch(re.escape(pattern).replace("%d", r"(\d+)"), value.name)
            if custom_match:
                layer, name = int(custom_match.group(1)), part
                present = present_pattern % layer
        if layer is None:
            continue
        shape = list(value.shape)
        kv = len(shape) == 4 and name in ("key", "value")
        batch_axis = _axis(shape, BATCH, 0)
        time_axis = _axis(shape, PAST, 2 if kv else None)
        if time_axis is None or batch_axis is None or batch_axis == time_axis:
            raise CacheLayoutError(
                f"{where}: cache input {value.name!r} has dims {shape}: need one"
                f" {PAST!r} (time) axis and one {BATCH!r} (batch) axis"
            )
        dims: list[int | None] = []
        for axis, dim in enumerate(shape):
            if axis in (batch_axis, time_axis):
                dims.append(None)
            elif isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif kv and head_dims is not None and axis in (1, 3):
                dims.append(int(head_dims[0 if axis == 1 else 1]))
            else:
                raise CacheLayoutError(
                    f"{where}: cache input {value.name!r} has dims {shape}: dim {axis}"
                    f" ({dim!r}) must be a number"
                )
        if present not in output_names:
            raise CacheLayoutError(
                f"{where}: cache input {value.name!r} has no matching output {present!r}"
            )
        tensor = CacheTensor(
            layer,
            name,
            value.name,
            present,
            tuple(dims),
            batch_axis,
            time_axis,
            _numpy_dtype(value.type),
        )
        found.setdefault(layer, []).append(tensor)
    if not found:
        return []
    count = max(found) + 1
    missing = [i for i in range(count) if i not in found]
    if missing:
        raise CacheLayoutError(
            f"{where}: no cache inputs for layer {missing[0]} ({PAST_PREFIX}{missing[0]}.*)"
            f" although layer {count - 1} has some"
        )
    return [tuple(found[i]) for i in range(count)]


def describe_layer(tensors: LayerCache) -> str:
    """``latent [batch, T, 512] float32 (2048 B/token), ...`` for one layer."""

    return ", ".join(
        f"{t.name} [{dims_text(t)}] {np.dtype(t.dtype).name} ({t.bytes_per_token} B/token)"
        for t in tensors
    )


class GraphPort:
    """An ONNX ``ValueInfoProto`` (graph input/output) seen as :func:`read_layout` reads an
    onnxruntime ``NodeArg``: ``name``, ``shape`` (dim_param or dim_value), ``type``
    (``tensor(float16)`` or ``tensor(float)``). Duck-typed, so the runtime needs no onnx."""

    FLOAT16 = 10  # onnx.TensorProto.FLOAT16

    def __init__(self, value) -> None:
        self.name = value.name
        tensor = value.type.tensor_type
        self.shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        half = tensor.elem_type == self.FLOAT16
        self.type = "tensor(float16)" if half else "tensor(float)"


def graph_layout(graph, *, where: str = "model") -> list[LayerCache]:
    """:func:`read_layout` of an ONNX ``GraphProto``'s inputs and outputs."""
    return read_layout(
        [GraphPort(v) for v in graph.input], [GraphPort(v) for v in graph.output], where=where
    )


def dims_text(tensor: CacheTensor, *, graph_names: bool = False) -> str:
    """``batch, T, 512`` (or ``batch_size, past_sequence_length, 512`` with
    ``graph_names``)."""
    batch, time = (BATCH, PAST) if graph_names else ("batch", "T")
    names = {tensor.batch_axis: batch, tensor.time_axis: time}
    return ", ".join(names.get(i, str(d)) for i, d in enumerate(tensor.dims))
