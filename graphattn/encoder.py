"""The encoder builder: BERT-style bidirectional models, one straight loop over layers.

I/O as Optimum's feature-extraction exports: ``input_ids``, ``attention_mask`` (and
``token_type_ids`` where the model has a type table) ``[batch_size, sequence_length]`` int64
→ ``last_hidden_state [batch_size, sequence_length, hidden]``; with ``sentence_embedding=True``
also ``sentence_embedding [batch_size, hidden]`` (mean over the real tokens, L2-normalized).

Per layer (``post``: BERT; ``pre``: ModernBERT)::

    post:  h = LN_attn(x + Attn(x));   x' = LN_mlp(h + MLP(h))
    pre:   h = x + Attn(LN_attn(x));   x' = h + MLP(LN_mlp(h))

``Attn`` is one ``graphattn.EncoderSelfAttention_<structure>`` call per layer
(:mod:`graphattn.ops.encoder_block`): q, k, v = x W (+ b) → SplitHeads ``[B, H, S, D]`` →
RoPE (where the layer has it) → ``ScaledDotProductAttention`` with the bidirectional bias
(one per distinct window, shared by the layers) → MergeHeads → ``W_o`` (+ b); its attributes
say what it computes (heads, head_dim, scale, ``window``, ``causal = 0``, RoPE kind and
``rotary_dim``, input roles). The ``portable`` and ``ort`` targets lower it by reading that
node to opset-23 ``Attention`` (``is_causal = 0``, the bias as ``attn_mask``, RoPE as
``RotaryEmbedding``) and record the decision per layer (``inspect --explain``). Positions:
column ``s`` of every row is position ``s`` (a right-padded batch keeps each row's positions).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphattn import __version__
from graphattn.encoder_spec import EncoderConfig, EncoderLayerSpec
from graphattn.layers import Weights, mlp, norm
from graphattn.ops import GraphEmitter
from graphattn.ops.encoder import bidirectional_bias, sentence_embedding
from graphattn.ops.encoder_block import encoder_attention_block
from graphattn.rope import rope_cos_sin
from graphattn.spec import BATCH, CONTEXT_KEY, SEQUENCE

INT64 = ir.DataType.INT64
ENCODER_KEY = "graphattn.encoder"  # metadata: the encoder's model_type
OUTPUTS = ("last_hidden_state", "sentence_embedding")


def _column_positions(g: GraphEmitter, input_ids: ir.Value) -> ir.Value:
    """position_ids [B, S] int64: ``s`` in column ``s`` of every row."""
    shape = g.op("Shape", [input_ids], name="positions/shape")
    length = g.op("Gather", [shape, g.constant("positions/one", np.array(1, np.int64))],
                  name="positions/length")  # fmt: skip
    zero = g.constant("positions/zero", np.array(0, np.int64))
    step = g.constant("positions/step", np.array(1, np.int64))
    columns = g.op("Range", [zero, length, step], name="positions/range")
    row = g.op("Unsqueeze", [columns, g.constant("positions/axis", np.array([0], np.int64))],
               name="positions/row")  # fmt: skip
    return g.op("Expand", [row, shape], name="position_ids")


def _attention(
    g: GraphEmitter,
    cfg: EncoderConfig,
    x: ir.Value,
    w: Weights,
    prefix: str,
    bias: ir.Value,
    layer: EncoderLayerSpec,
    cos_sin: tuple[ir.Value, ir.Value] | None,
    scope: str,
) -> ir.Value:
    """Bidirectional self-attention of ``x [B, S, C]`` → ``[B, S, C]``: one block call."""
    weights = {
        f"{part}_{kind}": w[f"{prefix}{part}.{kind}"]
        for part in "qkvo"
        for kind in ("weight", "bias")
        if f"{prefix}{part}.{kind}" in w
    }
    rope = layer.rope
    return encoder_attention_block(
        g,
        x,
        weights,
        bias_B1SS=bias,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        window=layer.window,
        rope="none" if rope is None else ("interleaved" if rope.interleaved else "halves"),
        cos_sin=cos_sin,
        rotary_dim=0 if rope is None else rope.rotary_dim,
        name=f"{scope}/attn",
    )


def build_encoder(
    cfg: EncoderConfig,
    tensors: Mapping[str, ir.TensorProtocol],
    *,
    dtype: ir.DataType = ir.DataType.FLOAT,
    with_sentence_embedding: bool = False,
) -> ir.Model:
    """The encoder graph for ``cfg``; ``tensors`` maps roles (see
    :mod:`graphattn.encoder_spec`) to (lazy) weight tensors of float type ``dtype``."""
    g = GraphEmitter(f"{cfg.model_type}_encoder")
    w = Weights(g, tensors)
    c = cfg.hidden_size
    input_ids = g.input("input_ids", INT64, [BATCH, SEQUENCE])
    attention_mask = g.input("attention_mask", INT64, [BATCH, SEQUENCE])
    token_type_ids = None
    if cfg.type_vocab_size:
        token_type_ids = g.input("token_type_ids", INT64, [BATCH, SEQUENCE])

    hidden = g.op("Gather", [w["embed_tokens"], input_ids], name="embed_tokens")
    position_ids = _column_positions(g, input_ids)
    if cfg.positions == "learned":
        placed = g.op("Gather", [w["embed_positions"], position_ids], name="embed_positions")
        hidden = g.op("Add", [hidden, placed], name="embed/positions")
    if token_type_ids is not None:
        typed = g.op("Gather", [w["embed_token_types"], token_type_ids], name="embed_token_types")
        hidden = g.op("Add", [hidden, typed], name="embed/token_types")
    if cfg.embedding_norm:
        hidden = norm(g, cfg.norm, hidden, w, "embed_norm", "embed_norm", c)

    biases: dict[int | None, ir.Value] = {}
    rotations: dict[tuple, tuple[ir.Value, ir.Value]] = {}
    for i, layer in enumerate(cfg.layers):
        scope, prefix = f"layers.{i}", f"layers.{i}."
        if layer.window not in biases:
            suffix = "" if not biases else f"_{len(biases)}"
            bias = bidirectional_bias(
                g, attention_mask, window=layer.window, name=f"attention_bias{suffix}"
            )
            # the bias in the activations' type (opset-23 Attention wants attn_mask as Q's)
            biases[layer.window] = g.op(
                "CastLike", [bias, hidden], name=f"attention_bias{suffix}/cast"
            )
        cos_sin = None
        if layer.rope is not None:
            if layer.rope.key not in rotations:
                suffix = "" if not rotations else f"_{len(rotations)}"
                cos, sin = rope_cos_sin(g, position_ids, layer.rope, name=f"rotary{suffix}")
                if dtype != ir.DataType.FLOAT:  # RotaryEmbedding wants cos/sin in x's type
                    cos = g.op("CastLike", [cos, hidden], name=f"rotary{suffix}/cos_cast")
                    sin = g.op("CastLike", [sin, hidden], name=f"rotary{suffix}/sin_cast")
                rotations[layer.rope.key] = (cos, sin)
            cos_sin = rotations[layer.rope.key]

        def normed(place: str, x: ir.Value, scope=scope, prefix=prefix) -> ir.Value:
            if f"{prefix}{place}.weight" not in w and f"{prefix}{place}.bias" not in w:
                return x  # no norm here (ModernBERT's first layer has no attn_norm)
            return norm(g, cfg.norm, x, w, f"{prefix}{place}", f"{scope}/{place}", c)

        if cfg.norm_placement == "post":
            attended = _attention(
                g, cfg, hidden, w, prefix, biases[layer.window], layer, cos_sin, scope
            )
            added = g.op("Add", [hidden, attended], name=f"{scope}/attn_residual")
            hidden = normed("post_attn_norm", added)
            fed = mlp(g, cfg.mlp, hidden, w, f"{prefix}mlp.", f"{scope}/mlp")
            added = g.op("Add", [hidden, fed], name=f"{scope}/mlp_residual")
            hidden = normed("post_mlp_norm", added)
        else:
            x = normed("attn_norm", hidden)
            attended = _attention(g, cfg, x, w, prefix, biases[layer.window], layer, cos_sin, scope)
            hidden = g.op("Add", [hidden, attended], name=f"{scope}/attn_residual")
            fed = mlp(g, cfg.mlp, normed("mlp_norm", hidden), w, f"{prefix}mlp.", f"{scope}/mlp")
            hidden = g.op("Add", [hidden, fed], name=f"{scope}/mlp_residual")
    if cfg.final_norm:
        hidden = norm(g, cfg.norm, hidden, w, "final_norm", "final_norm", c)

    g.output(hidden, "last_hidden_state", dtype, [BATCH, SEQUENCE, c])
    if with_sentence_embedding:
        pooled = sentence_embedding(g, hidden, attention_mask, name="sentence_embedding_pool")
        g.output(pooled, "sentence_embedding", dtype, [BATCH, c])
    model = g.model(producer_version=__version__)
    model.metadata_props[CONTEXT_KEY] = str(cfg.context_length)
    model.metadata_props[ENCODER_KEY] = cfg.model_type
    return model
