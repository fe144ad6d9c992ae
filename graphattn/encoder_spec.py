"""What an encoder graph is built from: :class:`EncoderConfig` and its per-layer
:class:`EncoderLayerSpec` (the decoder's :class:`~graphattn.spec.ModelConfig` describes causal
models with a KV cache; an encoder has neither).

An encoder maps ``input_ids [batch_size, sequence_length]`` (with ``attention_mask`` and, for
BERT, ``token_type_ids``) to ``last_hidden_state [batch_size, sequence_length, hidden]``; every
query attends every real key of its row (bidirectional), or the keys within ``window`` of it.

Weight roles (the builder in :mod:`graphattn.encoder` reads them; absent ones are no node):
``embed_tokens``, ``embed_positions`` (learned positions), ``embed_token_types``,
``embed_norm.weight|bias``; per layer ``layers.{i}.``: ``q|k|v|o.weight [in, out]`` and
``.bias``, ``attn_norm`` / ``mlp_norm`` (pre-norm) or ``post_attn_norm`` / ``post_mlp_norm``
(post-norm, BERT) ``.weight|.bias``, ``mlp.fc_weight|fc_bias|proj_weight|proj_bias`` (plain)
or ``mlp.gate_weight|up_weight|down_weight`` (gated, ``act(x W_gate) * x W_up``); then
``final_norm.weight|bias``.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphattn.spec import MlpSpec, NormSpec, RopeSpec

PLACEMENTS = ("post", "pre")  # post: BERT (norm after each residual add); pre: ModernBERT
POSITIONS = ("learned", "rope")


def _positive(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class EncoderLayerSpec:
    """One encoder layer: ``window`` W keeps keys with ``|query - key| < W`` (None: every key);
    ``rope`` rotates queries and keys (None: the positions were added to the embeddings)."""

    window: int | None = None
    rope: RopeSpec | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            _positive("encoder layer", "window", self.window)


@dataclass(frozen=True)
class EncoderConfig:
    """A bidirectional encoder (BERT, ModernBERT).

    ``norm_placement``: ``post`` (BERT: ``LN(x + attn(x))``, then ``LN(h + mlp(h))``, with a
    LayerNorm after the embeddings) or ``pre`` (``x + attn(LN(x))``; a layer whose plan has no
    ``attn_norm`` uses x as it is, ModernBERT's first layer). ``positions``: ``learned``
    (absolute table, position ``s`` for column ``s``) or ``rope``. ``type_vocab_size`` > 0
    adds the ``token_type_ids`` input and its table."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp: MlpSpec
    norm: NormSpec
    layers: tuple[EncoderLayerSpec, ...]
    context_length: int
    norm_placement: str = "post"
    positions: str = "learned"
    type_vocab_size: int = 0
    embedding_norm: bool = True
    final_norm: bool = False
    pad_token_id: int | None = None
    checkpoint_prefix: str = ""  # "bert." / "model." when a task head wraps the encoder

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "head_dim", "context_length"):
            _positive("encoder", name, getattr(self, name))
        if not self.layers:
            raise ValueError("encoder needs at least one layer")
        if self.norm_placement not in PLACEMENTS:
            raise ValueError(
                f"encoder norm_placement must be one of {PLACEMENTS}, got {self.norm_placement!r}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(
                f"encoder positions must be one of {POSITIONS}, got {self.positions!r}"
            )
        if self.mlp.kind not in ("plain", "gated"):
            raise ValueError(f"encoder MLP kind must be plain or gated, got {self.mlp.kind!r}")
        if self.positions == "rope" and any(layer.rope is None for layer in self.layers):
            raise ValueError("encoder positions 'rope' needs a RopeSpec on every layer")
        if self.type_vocab_size < 0:
            raise ValueError(f"encoder type_vocab_size must be >= 0, got {self.type_vocab_size}")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def intermediate_size(self) -> int:
        return self.mlp.intermediate_size

    @property
    def tie_word_embeddings(self) -> bool:
        """Encoders have no output projection (read by the export's unexpected-tensor check)."""
        return False
