"""Spec types: what an architecture file in ``graphattn.models`` produces.

A :class:`ModelConfig` says what the graph computes: model-wide facts (vocabulary, embedding
and logit scales, final norm) and one :class:`LayerSpec` per layer (its attention, norms, MLP
and residual form). A :class:`WeightSource` says where one graph initializer comes from in the
checkpoint and which NumPy fix-ups (transpose, row slices, ``1 + w``, ...) make it the layout
the graph wants. Builders and exporters only see these types.
"""

from __future__ import annotations

import dataclasses
import math
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
LOWERING_KEY = "graphattn.lowering"  # per layer: the kernel each attention block became, and why

# Symbolic dims of a decoder's I/O, named as Optimum and ONNX Runtime GenAI name them
# (transformers.js resolves only BATCH when it builds its empty cache from the graph).
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"

NORM_KINDS = ("rms", "layer")
MLP_KINDS = ("gated", "plain", "moe")
ROUTER_SCORES = ("softmax", "sigmoid")
LATENT_FORMS = ("absorbed", "expanded")
# activation name -> what it computes (see graphattn.layers)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
RESIDUALS = ("sequential", "parallel")
QK_NORM_SCOPES = ("head", "full")
# Sparse attention kinds of a layer (graphattn.ops.sparse_attention), and their options.
SPARSE_KINDS = ("native_sparse", "sparse_routed")
SPARSE_SELECTIONS = ("head", "group")
SPARSE_GATES = ("head", "token")


def _positive_int(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive int, got {value!r}")


def _positive_or_none(owner: str, name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner} {name} must be a positive number or None, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner} {name} must be finite, got {value!r}")


def _choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner} {name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class NormSpec:
    """A normalization over the last axis: ``rms`` or ``layer`` (LayerNorm), with ``epsilon``.

    Whether it has a scale or a bias is the weight plan's business (a role that is absent is
    no input: OLMo's LayerNorm has neither); ``1 + w`` norms are a weight fix-up."""

    kind: str
    epsilon: float

    def __post_init__(self) -> None:
        _choice("norm", "kind", self.kind, NORM_KINDS)
        _positive_or_none("norm", "epsilon", self.epsilon)


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer: the first ``rotary_dim`` channels of each head rotate,
    split-halves or ``interleaved`` pairs, base ``theta``, HF ``scaling`` dict (``rope_type``
    linear, dynamic, yarn, longrope, llama3) or None. ``original_context``: the pre-scaling
    context for scalings that need it when the dict does not say (Phi-3 longrope)."""

    rotary_dim: int
    theta: float
    scaling: Mapping[str, object] | None = None
    interleaved: bool = False
    original_context: int | None = None
    context: int = 0  # max_position_embeddings of the model (yarn, longrope read it)

    def __post_init__(self) -> None:
        _positive_int("rope", "rotary_dim", self.rotary_dim)
        if self.rotary_dim % 2:
            raise ValueError(f"rope rotary_dim must be even, got {self.rotary_dim}")
        _positive_or_none("rope", "theta", self.theta)

    @property
    def key(self) -> tuple:
        """Identity for sharing one cos/sin computation between layers."""
        scaling = tuple(sorted((k, repr(v)) for k, v in (self.scaling or {}).items()))
        return (self.rotary_dim, self.theta, scaling, self.original_context, self.context)


@dataclass(frozen=True)
class LatentSpec:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from a compressed
    latent ``c = norm(x W_kv_a[:, :kv_lora_rank]) [B, S, kv_lora_rank]`` and one decoupled
    rope key ``x W_kv_a[:, kv_lora_rank:] [B, S, qk_rope_head_dim]`` shared by all heads;
    ``kv_b`` expands ``c`` into per-head ``k_nope [qk_nope_head_dim]`` and ``v
    [v_head_dim]``. Queries come from ``x W_q`` or, with ``q_lora_rank``, from
    ``norm(x W_q_a) W_q_b``; each query head is ``[nope | rope]`` (RoPE on the rope part only).
    ``norm`` is the RMSNorm of the latent (and of the low-rank query).

    The cache holds ``c`` and the rotated rope key, not K/V. ``form``: ``absorbed`` (the
    query is moved into latent space by ``W_UK`` and the output leaves it by ``W_UV``, both
    sliced from ``kv_b`` at export time: an MQA over ``[c | rope key]``) or ``expanded``
    (K/V expanded from the whole cached latent at every step; for comparison)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    norm: NormSpec
    q_lora_rank: int | None = None
    form: str = "absorbed"

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive_int("latent attention", name, getattr(self, name))
        if self.q_lora_rank is not None:
            _positive_int("latent attention", "q_lora_rank", self.q_lora_rank)
        _choice("latent attention", "form", self.form, LATENT_FORMS)


@dataclass(frozen=True)
class SparseSpec:
    """Sparse attention of one layer (:mod:`graphattn.ops.sparse_attention`).

    ``native_sparse`` (NSA): coarse blocks of ``block_size`` keys (the ``top_blocks`` best
    by the query's score against each block's mean key, attended at full resolution), the
    ``top_tokens`` best single keys, and a causal ``window`` of the last W keys, mixed by
    sigmoid gates: ``gates`` ``head`` (learned logits ``[num_heads]`` per path) or ``token``
    (a gate projection ``x W_gate [B, S, 3·num_heads]``, rows coarse | fine | window).
    Queries and keys are rotated as in a dense layer; the cache holds rotated keys.

    ``sparse_routed``: segments of ``block_size`` keys, the ``top_blocks`` (top-k) segments
    by cosine similarity of the query to each segment's centroid, attention over them with
    RoPE applied to the query and to every gathered key at its own position: the cache holds
    keys *before* RoPE (``top_tokens``, ``window`` and ``gates`` do not apply).

    ``selection``: ``head`` (each query head chooses) or ``group`` (the query heads of one
    KV head share the choice, ranked by their summed scores)."""

    kind: str
    block_size: int
    top_blocks: int
    top_tokens: int = 0
    window: int = 0
    selection: str = "head"
    gates: str = "head"

    def __post_init__(self) -> None:
        _choice("sparse attention", "kind", self.kind, SPARSE_KINDS)
        owner = self.kind.replace("_", " ") + " attention"
        _positive_int(owner, "block_size", self.block_size)
        _positive_int(owner, "top_blocks", self.top_blocks)
        _choice(owner, "selection", self.selection, SPARSE_SELECTIONS)
        if self.kind == "native_sparse":
            _positive_int(owner, "top_tokens", self.top_tokens)
            _positive_int(owner, "window", self.window)
            _choice(owner, "gates", self.gates, SPARSE_GATES)
        elif self.top_tokens or self.window or self.gates != "head":
            raise ValueError(f"{owner} has no top_tokens, window or gates")


@dataclass(frozen=True)
class AttentionSpec:
    """Self-attention of one layer.

    ``num_heads`` query heads and ``kv_heads`` key/value heads of ``head_dim``; ``rope`` or None
    (NoPE layers, learned positions); ``window``: attend the last W positions, or None;
    ``scale`` of the scores (default ``1/sqrt(head_dim)``); ``softcap`` of the scores;
    ``qk_norm``: RMS/LayerNorm of queries and keys per ``head`` (Qwen3, Gemma 3) or over the
    ``full`` projection width (OLMo 2), or None; ``clip_qkv``: q/k/v clamped to ±c (OLMo);
    ``alibi_slopes``: ALiBi, one slope per query head (Bloom, MPT, Falcon): the scores get
    ``slope_h · (key position among the row's real tokens)`` added (after ``scale``; a family
    whose bias is scaled too folds that into its slopes); ``causal``: decoders are.
    ``sparse``: the layer is native sparse or sparse routed attention (:class:`SparseSpec`;
    causal, RoPE or none for NSA, RoPE required for routed; no window, softcap, ALiBi, sinks,
    qk-norm, clip or latent). Projection biases exist where the weight plan has them."""

    num_heads: int
    kv_heads: int
    head_dim: int
    rope: RopeSpec | None = None
    window: int | None = None
    scale: float | None = None
    softcap: float | None = None
    qk_norm: NormSpec | None = None
    qk_norm_scope: str = "head"
    clip_qkv: float | None = None
    alibi_slopes: tuple[float, ...] | None = None
    causal: bool = True
    sinks: bool = False
    latent: LatentSpec | None = None
    sparse: SparseSpec | None = None

    def __post_init__(self) -> None:
        for name in ("num_heads", "kv_heads", "head_dim"):
            _positive_int("attention", name, getattr(self, name))
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"config num_key_value_heads={self.kv_heads} must divide "
                f"num_attention_heads={self.num_heads}"
            )
        if self.window is not None:
            _positive_int("attention", "sliding_window", self.window)
        for name in ("scale", "softcap", "clip_qkv"):
            _positive_or_none("attention", name, getattr(self, name))
        _choice("attention", "qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        if self.rope is not None and self.rope.rotary_dim > self.head_dim:
            raise ValueError(
                f"rope rotary_dim={self.rope.rotary_dim} exceeds head_dim={self.head_dim}"
            )
        if self.alibi_slopes is not None:
            if self.rope is not None:
                raise ValueError("attention cannot have both rope and alibi")
            if len(self.alibi_slopes) != self.num_heads:
                raise ValueError(
                    f"alibi needs {self.num_heads} slopes (one per head), got"
                    f" {len(self.alibi_slopes)}"
                )

        if self.sparse is not None:
            self._check_sparse()
        if self.latent is not None:
            width = self.latent.qk_nope_head_dim + self.latent.qk_rope_head_dim
            if self.head_dim != width:
                raise ValueError(
                    f"latent attention head_dim={self.head_dim} must be qk_nope_head_dim +"
                    f" qk_rope_head_dim = {width}"
                )
            if self.rope is not None and self.rope.rotary_dim != self.latent.qk_rope_head_dim:
                raise ValueError(
                    f"latent attention rotates qk_rope_head_dim={self.latent.qk_rope_head_dim}"
                    f" channels, rope says {self.rope.rotary_dim}"
                )

    def _check_sparse(self) -> None:
        owner = self.sparse.kind.replace("_", " ") + " attention"
        conflicts = {
            "sliding_window": self.window is not None,
            "softcap": self.softcap is not None,
            "qk_norm": self.qk_norm is not None,
            "clip_qkv": self.clip_qkv is not None,
            "alibi": self.alibi_slopes is not None,
            "sinks": self.sinks,
            "latent attention": self.latent is not None,
            "non-causal attention": not self.causal,
        }
        for what, present in conflicts.items():
            if present:
                raise ValueError(f"{owner} cannot be combined with {what}")
        if self.sparse.kind == "sparse_routed" and self.rope is None:
            raise ValueError(f"{owner} needs RoPE (it rotates the gathered keys itself)")

    @property
    def effective_scale(self) -> float:
        """The score scale: ``scale``, else ``1/sqrt(head_dim)``."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else float(self.scale)

    @property
    def cache(self) -> tuple[tuple[str, tuple[str | int, ...]], ...]:
        """This layer's cache tensors: ``(name, dims)`` with ``PAST`` as the time axis, named
        ``past_key_values.{i}.<name>`` / ``present.{i}.<name>`` (``PAST`` → ``TOTAL``).
        Ordinary and sparse attention: ``key``, ``value [batch_size, kv_heads, T, head_dim]``
        (a ``sparse_routed`` layer's ``key`` holds keys before RoPE); latent
        attention: ``latent [batch_size, T, kv_lora_rank]`` and ``rope_key [batch_size, T,
        qk_rope_head_dim]``."""
        if self.latent is not None:
            return (
                ("latent", (BATCH, PAST, self.latent.kv_lora_rank)),
                ("rope_key", (BATCH, PAST, self.latent.qk_rope_head_dim)),
            )
        shape = (BATCH, self.kv_heads, PAST, self.head_dim)
        return (("key", shape), ("value", shape))


@dataclass(frozen=True)
class MoeSpec:
    """A mixture of ``num_experts`` gated experts of width ``expert_size``, ``top_k`` per token.

    Router: ``logits = x W_router (+ router bias)`` ``[N, E]``; ``scores`` = ``softmax`` or
    ``sigmoid`` of them. Selection: with ``groups`` > 1 the experts form equal groups, each
    group scored by the sum of its top-2 selection scores (``group_score`` ``top2_sum``,
    DeepSeek-V3) or its best score (``max``, DeepSeek-V2's ``group_limited_greedy``), and only
    the best ``topk_groups`` groups stay; then the ``top_k`` experts by selection score, where
    the selection score is the score plus the weight role ``router.score_bias`` when it exists
    (DeepSeek-V3's ``e_score_correction_bias``, used to choose, not to weight). Weights: the
    chosen experts' scores, divided by their sum when ``normalize`` (``norm_topk_prob``;
    Mixtral and GPT-OSS always), times ``scaling`` (``routed_scaling_factor``).

    Each expert is gated: ``down(act(gate(x)) * up(x))`` (``activation`` of the MlpSpec, with
    biases where the plan has them). ``swiglu_limit``: GPT-OSS's clamped form ``gate =
    min(gate, limit)``, ``up = clip(up, ±limit)``, ``glu = gate·σ(swiglu_alpha·gate)``, output
    ``(up + 1)·glu``. ``shared_size``: width of the always-on shared expert(s) added to the
    routed sum (DeepSeek's ``n_shared_experts × moe_intermediate_size``, Qwen2-MoE's
    ``shared_expert_intermediate_size``), scaled by ``σ(x W_shared_gate)`` when the plan has
    ``shared_gate.weight`` (Qwen2-MoE)."""

    num_experts: int
    top_k: int
    expert_size: int
    scores: str = "softmax"
    normalize: bool = False
    scaling: float = 1.0
    groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    shared_size: int | None = None
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "expert_size", "groups", "topk_groups"):
            _positive_int("moe", name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe num_experts_per_tok={self.top_k} exceeds n_routed_experts={self.num_experts}"
            )
        if self.num_experts % self.groups or self.topk_groups > self.groups:
            raise ValueError(
                f"moe n_group={self.groups} must divide the {self.num_experts} experts and be"
                f" at least topk_group={self.topk_groups}"
            )
        _choice("moe", "scores", self.scores, ROUTER_SCORES)
        _choice("moe", "group_score", self.group_score, ("top2_sum", "max"))
        _positive_or_none("moe", "routed_scaling_factor", self.scaling)
        if self.shared_size is not None:
            _positive_int("moe", "shared_size", self.shared_size)
        _positive_or_none("moe", "swiglu_limit", self.swiglu_limit)


@dataclass(frozen=True)
class MlpSpec:
    """Feed-forward block: ``gated`` (``act(x W_gate) * (x W_up)`` then ``W_down``), ``plain``
    (``act(x W_fc)`` then ``W_proj``) or ``moe`` (a :class:`MoeSpec` mixture of gated
    experts), ``activation`` one of ACTIVATIONS, width ``intermediate_size`` (for ``moe``: the
    expert width). Biases exist where the weight plan has them."""

    kind: str
    activation: str
    intermediate_size: int
    moe: MoeSpec | None = None

    def __post_init__(self) -> None:
        _choice("mlp", "kind", self.kind, MLP_KINDS)
        _choice("mlp", "activation", self.activation, ACTIVATIONS)
        _positive_int("mlp", "intermediate_size", self.intermediate_size)
        if (self.kind == "moe") != (self.moe is not None):
            raise ValueError("mlp kind 'moe' and a MoeSpec go together")


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer.

    ``norms`` names the norms that exist, each a :class:`NormSpec` keyed by place:
    ``attn_norm`` (before attention), ``post_attn_norm`` (on the attention output, before the
    residual add: Gemma 2/3, OLMo 2), ``mlp_norm`` (before the MLP) and ``post_mlp_norm``.
    ``residual``: ``sequential`` (``h += attn(...)`` then ``h += mlp(...)``) or ``parallel``
    (``h += attn(n1(h)) + mlp(n2(h))``, where a missing ``mlp_norm`` means the MLP reads the
    attention norm's output: GPT-J, Phi-2, Falcon). ``residual_scale`` multiplies each branch
    before it is added (Granite's ``residual_multiplier``)."""

    attention: AttentionSpec
    mlp: MlpSpec
    norms: Mapping[str, NormSpec]
    residual: str = "sequential"
    residual_scale: float | None = None

    def __post_init__(self) -> None:
        _choice("layer", "residual", self.residual, RESIDUALS)
        unknown = set(self.norms) - {"attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"}
        if unknown:
            raise ValueError(f"layer norms: unknown places {sorted(unknown)}")
        _positive_or_none("layer", "residual_scale", self.residual_scale)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: model-wide facts plus one :class:`LayerSpec` per layer.

    ``positions``: ``"learned"`` (a position table, GPT-2) or None (positions live in each
    layer's attention: RoPE, ALiBi or none). ``embedding_scale`` multiplies the token
    embeddings (Gemma ``sqrt(hidden)``, Granite); ``logit_scale`` multiplies the logits
    (Cohere; Granite's ``1/logits_scaling``); ``final_softcap`` caps them (Gemma 2).
    ``final_norm`` is the norm before the output projection; ``embedding_norm`` one right
    after the embeddings (Bloom's ``word_embeddings_layernorm``), or None."""

    model_type: str
    vocab_size: int
    hidden_size: int
    context_length: int
    layers: tuple[LayerSpec, ...]
    final_norm: NormSpec
    positions: str | None = None
    embedding_scale: float | None = None
    logit_scale: float | None = None
    final_softcap: float | None = None
    embedding_norm: NormSpec | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "context_length"):
            _positive_int("config", name, getattr(self, name))
        if not self.layers:
            raise ValueError("config num_hidden_layers must be a positive int, got 0")
        if self.positions not in (None, "learned"):
            raise ValueError(f"config positions must be learned or None, got {self.positions!r}")
        _positive_or_none("config", "embedding_scale", self.embedding_scale)
        _positive_or_none("config", "logit_scale", self.logit_scale)
        _positive_or_none("config", "final_softcap", self.final_softcap)
        shapes = {layer.attention.cache for layer in self.layers}
        if len(shapes) != 1:
            raise ValueError(f"layers must share one KV cache shape, got {sorted(shapes)}")

    # Uniform facts the runtime, genai_config and inspect read (every layer shares them).
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.layers[0].attention.num_heads

    @property
    def kv_heads(self) -> int:
        return self.layers[0].attention.kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].attention.head_dim

    @property
    def intermediate_size(self) -> int:
        return self.layers[0].mlp.intermediate_size

    @property
    def cache(self) -> tuple[tuple[str, tuple[str | int, ...]], ...]:
        """Every layer's cache tensors (:attr:`AttentionSpec.cache`; layers share them)."""
        return self.layers[0].attention.cache

    @property
    def latent(self) -> bool:
        """Whether the cache holds MLA latents instead of K/V."""
        return self.layers[0].attention.latent is not None

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def replace_attention(self, **changes: object) -> ModelConfig:
        """A copy with the same attention fields changed in every layer."""
        layers = tuple(
            dataclasses.replace(layer, attention=dataclasses.replace(layer.attention, **changes))
            for layer in self.layers
        )
        return dataclasses.replace(self, layers=layers)


Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class WeightSource:
    """One graph initializer: ``name`` in the graph, read from checkpoint tensor ``source``.

    ``transform`` maps the checkpoint array (float32) to the graph layout; ``shape`` is the
    checkpoint tensor's expected shape, checked before anything is read; ``out_shape`` the
    graph's (after the transform) when it differs. ``optional``: the role exists only when
    the checkpoint has the tensor (a bias the config does not announce)."""

    name: str
    source: str
    shape: tuple[int, ...]
    transform: Transform | None = None
    out_shape: tuple[int, ...] | None = None
    optional: bool = False

    @property
    def graph_shape(self) -> tuple[int, ...]:
        """Shape of the initializer in the graph (after the transform)."""
        return self.shape if self.out_shape is None else self.out_shape


# ------------------------------------------------------------------ weight fix-ups (compose)
def transpose(array: np.ndarray) -> np.ndarray:
    """``[out, in]`` (torch Linear) → ``[in, out]`` (MatMul), as a contiguous copy."""
    return np.ascontiguousarray(array.T)


def plus_one(array: np.ndarray) -> np.ndarray:
    """``1 + w``: norms stored as offsets from one (Gemma, Nemotron's layernorm1p)."""
    return array + np.float32(1.0)


def rows(start: int, stop: int) -> Transform:
    """Rows ``start:stop`` (a torch-layout fused projection ``[out, in]`` or a bias ``[out]``
    cut into pieces of unequal width: Phi-3's ``qkv_proj``, Falcon's MQA ``query_key_value``)."""

    def take(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[start:stop])

    take.__name__ = f"rows_{start}_{stop}"
    take.row_span = (start, stop)  # read by row_span(): block-quantized rows slice the same
    return take


def column_block(index: int, count: int) -> Transform:
    """A transform taking column block ``index`` of ``count`` equal blocks (GPT-2's fused QKV,
    Conv1D ``[in, 3C]``)."""

    def take(array: np.ndarray) -> np.ndarray:
        width = array.shape[-1] // count
        return np.ascontiguousarray(array[..., index * width : (index + 1) * width])

    take.__name__ = f"column_block_{index}_of_{count}"
    return take


def per_head_rows(index: int, parts: int, heads: int) -> Transform:
    """Rows of part ``index`` from a fused projection whose rows are grouped per head
    (``[heads, parts, head_dim]`` along dim 0, GPT-NeoX's and Bloom's ``query_key_value``):
    returns ``[heads * head_dim, ...]`` in head order."""

    def take(array: np.ndarray) -> np.ndarray:
        grouped = array.reshape(heads, parts, -1, *array.shape[1:])
        return np.ascontiguousarray(grouped[:, index].reshape(-1, *array.shape[1:]))

    take.__name__ = f"per_head_rows_{index}_of_{parts}"
    return take


def latent_up(part: str, heads: int, nope: int, value: int) -> Transform:
    """MLA's ``kv_b_proj.weight [heads·(nope + value), kv_lora_rank]`` (torch layout, rows per
    head ``[k_nope | v]``) → ``key`` ``W_UK [heads, nope, kv_lora_rank]`` (``k_nope[t, h] =
    W_UK[h] @ c[t]``, so the absorbed query is ``q_nope[h] @ W_UK[h]``) or ``value`` ``W_UV
    [heads, kv_lora_rank, value]`` (``out[h] = out_latent[h] @ W_UV[h]``)."""
    if part not in ("key", "value"):
        raise ValueError(f"latent_up part must be key or value, got {part!r}")

    def take(array: np.ndarray) -> np.ndarray:
        grouped = array.reshape(heads, nope + value, -1)
        if part == "key":
            return np.ascontiguousarray(grouped[:, :nope, :])
        return np.ascontiguousarray(grouped[:, nope:, :].transpose(0, 2, 1))

    take.__name__ = f"latent_up_{part}"
    return take


def compose(*transforms: Transform | None) -> Transform | None:
    """The fix-ups applied left to right (``compose(rows(0, 64), transpose)``); None if none."""
    steps = [t for t in transforms if t is not None]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def run(array: np.ndarray) -> np.ndarray:
        for step in steps:
            array = step(array)
        return array

    run.__name__ = "∘".join(getattr(s, "__name__", "fixup") for s in reversed(steps))
    run.steps = tuple(steps)
    return run


def row_span(transform: Transform | None) -> tuple[int, int] | None | bool:
    """How a torch-layout weight's fix-up selects its rows (output features): None for all of
    them (no fix-up, or ``transpose`` alone), ``(start, stop)`` for ``rows(start, stop)``
    then ``transpose``, False for any other fix-up (its rows are not a plain slice)."""
    if transform is None or transform is transpose:
        return None
    steps = getattr(transform, "steps", None)
    if steps is not None and len(steps) == 2 and steps[1] is transpose:
        span = getattr(steps[0], "row_span", None)
        if span is not None:
            return span
    return False


@dataclass(frozen=True)
class GGUFSpec:
    """How one family reads a GGUF file (declared in the family's file).

    ``arch``: the file's ``general.architecture``. ``config(fields, need) -> dict``: an HF
    ``config.json`` dict from the metadata. ``tensor_names``: GGUF name → HF name for names
    outside layers; ``layer_names``: for ``blk.{i}.<suffix>``. ``permuted_rows``: HF suffixes
    whose rows llama.cpp's converter permuted for its RoPE (``{suffix: config key of the
    head count}``), undone at load."""

    arch: str
    config: Callable[[Mapping[str, object], Callable[[str], object]], dict]
    tensor_names: Mapping[str, str]
    layer_names: Mapping[str, str]
    layer_prefix: str = "model.layers"
    permuted_rows: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Architecture:
    """What one file in ``graphattn.models`` registers.

    ``config_from_hf(config_json) -> ModelConfig``; ``weights(config) -> {role: WeightSource}``
    with the roles the builder reads; ``ignored`` lists checkpoint-name suffixes that may be
    present but are not weights (buffers such as ``attn.masked_bias``); ``ignored_prefixes``
    checkpoint-name prefixes of parts the export leaves out (Gemma 3's vision tower);
    ``gguf`` how its GGUF files read, if they do."""

    name: str
    hf_architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, object]], ModelConfig]
    weights: Callable[[ModelConfig], dict[str, WeightSource]]
    ignored: tuple[str, ...] = ()
    genai_type: str = ""
    gguf: GGUFSpec | None = None
    ignored_prefixes: tuple[str, ...] = ()
