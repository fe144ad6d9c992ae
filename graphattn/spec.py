"""Spec types: what an architecture file in ``graphattn.models`` produces.

A :class:`ModelConfig` says what the graph computes; a :class:`WeightSource` says where one
graph initializer comes from in the checkpoint and which NumPy fix-up (transpose, column split)
makes it the layout the graph wants. Builders and exporters only see these types.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

# Model metadata the builder and compiler write (runtime/session.py reads the same keys; the
# runtime imports nothing from the builder side, so it spells them itself).
CONTEXT_KEY = "graphattn.context_length"  # positions the graph supports (RoPE tables)
KV_BUFFER_KEY = "graphattn.kv_buffer"  # "shared": past and present may be one buffer
MIN_ORT_KEY = "graphattn.min_onnxruntime"  # "X.Y": the oldest onnxruntime that runs the graph
# "one_token": a batch of several rows continuing after a past takes one token per call
CONTINUATION_KEY = "graphattn.batched_continuation"

# Symbolic dims of a decoder's I/O, named as Optimum and ONNX Runtime GenAI name them
# (transformers.js resolves only BATCH when it builds its empty cache from the graph).
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, architecture-neutral.

    ``positions``: ``"learned"`` (GPT-2 position table) or ``"rotary"``. ``norm``: ``"layer"``
    or ``"rms"``. ``mlp``: ``"gelu"`` (fc/proj with biases) or ``"swiglu"`` (gate/up/down).
    ``window``: sliding-window length W (attend the last W positions) or None.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    positions: str
    norm: str
    norm_epsilon: float
    mlp: str
    qkv_bias: bool = False
    out_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, object] | None = None
    rotary_dim: int | None = None
    rope_interleaved: bool = False
    window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive int, got {value!r}")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"config num_key_value_heads={self.kv_heads} must divide "
                f"num_attention_heads={self.num_heads}"
            )
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"config positions must be learned or rotary, got {self.positions!r}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"config norm must be layer or rms, got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"config mlp must be gelu or swiglu, got {self.mlp!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"config sliding_window must be >= 1, got {self.window}")

    @property
    def effective_rotary_dim(self) -> int:
        """Channels of each head that rotate (all of head_dim unless partial)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class WeightSource:
    """One graph initializer: ``name`` in the graph, read from checkpoint tensor ``source``.

    ``transform`` maps the checkpoint array (float32) to the graph layout; ``shape`` is the
    checkpoint tensor's expected shape, checked before anything is read.
    """

    name: str
    source: str
    shape: tuple[int, ...]
    transform: Transform | None = None
    out_shape: tuple[int, ...] | None = None

    @property
    def graph_shape(self) -> tuple[int, ...]:
        """Shape of the initializer in the graph (after the transform)."""
        return self.shape if self.out_shape is None else self.out_shape


def transpose(array: np.ndarray) -> np.ndarray:
    """``[out, in]`` (torch Linear) → ``[in, out]`` (MatMul), as a contiguous copy."""
    return np.ascontiguousarray(array.T)


def column_block(index: int, count: int) -> Transform:
    """A transform taking column block ``index`` of ``count`` equal blocks (fused QKV split)."""

    def take(array: np.ndarray) -> np.ndarray:
        width = array.shape[-1] // count
        return np.ascontiguousarray(array[..., index * width : (index + 1) * width])

    take.__name__ = f"column_block_{index}_of_{count}"
    return take


@dataclass(frozen=True)
class Architecture:
    """What one file in ``graphattn.models`` registers.

    ``config_from_hf(config_json) -> ModelConfig``; ``weights(config) -> {role: WeightSource}``
    with the roles the builder reads; ``ignored`` lists checkpoint-name suffixes that may be
    present but are not weights (buffers such as ``attn.masked_bias``).
    """

    name: str
    hf_architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, object]], ModelConfig]
    weights: Callable[[ModelConfig], dict[str, WeightSource]]
    ignored: tuple[str, ...] = ()
    genai_type: str = ""
