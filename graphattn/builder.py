"""The decoder builder: one straight loop over layers composing ``graphattn.ops`` functions.

I/O follows Optimum / ONNX Runtime GenAI so their apps run our files unchanged:
``input_ids [batch_size, sequence_length]``, ``attention_mask [batch_size,
total_sequence_length]``, ``position_ids [batch_size, sequence_length]`` (int64),
``past_key_values.{i}.key|value [batch_size, kv_heads, past_sequence_length, head_dim]`` →
``logits [batch_size, sequence_length, vocab]``, ``present.{i}.key|value [batch_size, kv_heads,
total_sequence_length, head_dim]``. The symbolic dims carry exactly those names (transformers.js
builds its empty cache from them and resolves only ``batch_size``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphattn import __version__, ops
from graphattn.ops import GraphEmitter
from graphattn.spec import BATCH, CONTEXT_KEY, PAST, SEQUENCE, TOTAL, ModelConfig

INT64 = ir.DataType.INT64


class _Weights:
    """Graph initializers by builder role; a tensor shared by two roles becomes one initializer."""

    def __init__(self, g: GraphEmitter, tensors: Mapping[str, ir.TensorProtocol]) -> None:
        self._g, self._tensors, self._values = g, tensors, {}

    def __contains__(self, role: str) -> bool:
        return role in self._tensors

    def __getitem__(self, role: str) -> ir.Value:
        if role not in self._tensors:
            raise KeyError(
                f"the builder needs weight role {role!r}, which the plan does not provide"
            )
        tensor = self._tensors[role]
        if tensor.name not in self._values:
            self._values[tensor.name] = self._g.initializer(tensor.name, tensor)
        return self._values[tensor.name]


def _linear(g: GraphEmitter, x: ir.Value, w: _Weights, role: str, name: str) -> ir.Value:
    y = g.op("MatMul", [x, w[f"{role}.weight"]], name=name)
    if f"{role}.bias" in w:
        y = g.op("Add", [y, w[f"{role}.bias"]], name=f"{name}/bias")
    return y


def _norm(g: GraphEmitter, cfg: ModelConfig, x: ir.Value, w: _Weights, role: str, name: str):
    if cfg.norm == "rms":
        return ops.rms_norm(g, x, w[f"{role}.weight"], epsilon=cfg.norm_epsilon, name=name)
    return ops.layer_norm(
        g, x, w[f"{role}.weight"], w[f"{role}.bias"], epsilon=cfg.norm_epsilon, name=name
    )


def build_decoder(
    cfg: ModelConfig,
    tensors: Mapping[str, ir.TensorProtocol],
    *,
    dtype: ir.DataType = ir.DataType.FLOAT,
    last_logits_only: bool = False,
) -> ir.Model:
    """The decoder graph for ``cfg``; ``tensors`` maps builder roles to (lazy) weight tensors.

    ``dtype`` is the float type of the weights, KV cache and logits (FLOAT or FLOAT16).
    ``last_logits_only``: logits ``[batch_size, 1, vocab]`` for the last position only
    (prefill skips the output projection of every other position); else ``[batch_size,
    sequence_length, vocab]``.
    """
    g = GraphEmitter(f"{cfg.model_type}_decoder")
    w = _Weights(g, tensors)
    heads, kv_heads, head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    input_ids = g.input("input_ids", INT64, [BATCH, SEQUENCE])
    attention_mask = g.input("attention_mask", INT64, [BATCH, TOTAL])
    position_ids = g.input("position_ids", INT64, [BATCH, SEQUENCE])
    past_shape = [BATCH, kv_heads, PAST, head_dim]
    pasts = [
        (
            g.input(f"past_key_values.{i}.key", dtype, past_shape),
            g.input(f"past_key_values.{i}.value", dtype, past_shape),
        )
        for i in range(cfg.num_layers)
    ]

    hidden = g.op("Gather", [w["embed_tokens"], input_ids], name="embed_tokens")
    if cfg.positions == "learned":
        placed = g.op("Gather", [w["embed_positions"], position_ids], name="embed_positions")
        hidden = g.op("Add", [hidden, placed], name="embed")
    bias = ops.attention_bias(
        g, attention_mask, input_ids, causal=True, window=cfg.window, name="attention_bias"
    )
    if cfg.positions == "rotary":
        cos, sin = ops.rotary_cos_sin(
            g,
            position_ids,
            rotary_dim=cfg.effective_rotary_dim,
            theta=cfg.rope_theta,
            scaling=cfg.rope_scaling,
            name="rotary",
        )

    presents = []
    for i, (past_key, past_value) in enumerate(pasts):
        scope, layer = f"layers.{i}", f"layers.{i}."
        x = _norm(g, cfg, hidden, w, f"{layer}attn_norm", f"{scope}/attn_norm")
        query, key, value = (
            ops.split_heads(
                g,
                _linear(g, x, w, f"{layer}{part}", f"{scope}/attn/{part}_proj"),
                heads=count,
                name=f"{scope}/attn/{part}_heads",
            )
            for part, count in (("q", heads), ("k", kv_heads), ("v", kv_heads))
        )
        if cfg.positions == "rotary":
            query, key = (
                ops.apply_rotary(
                    g,
                    x_heads,
                    cos,
                    sin,
                    head_dim=head_dim,
                    rotary_dim=cfg.effective_rotary_dim,
                    interleaved=cfg.rope_interleaved,
                    name=f"{scope}/attn/{part}_rotary",
                )
                for part, x_heads in (("q", query), ("k", key))
            )
        attended, present_key, present_value = ops.scaled_dot_product_attention(
            g,
            query,
            key,
            value,
            num_heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            mask=bias,
            past_key_BKPD=past_key,
            past_value_BKPD=past_value,
            name=f"{scope}/attn",
        )
        merged = ops.merge_heads(g, attended, name=f"{scope}/attn/merge_heads")
        projected = _linear(g, merged, w, f"{layer}o", f"{scope}/attn/o_proj")
        hidden = g.op("Add", [hidden, projected], name=f"{scope}/attn_residual")
        x = _norm(g, cfg, hidden, w, f"{layer}mlp_norm", f"{scope}/mlp_norm")
        mlp_roles = ("fc_weight", "fc_bias", "proj_weight", "proj_bias")
        if cfg.mlp == "swiglu":
            mlp_roles = ("gate_weight", "up_weight", "down_weight")
        mlp_weights = {role: w[f"{layer}mlp.{role}"] for role in mlp_roles}
        emit_mlp = ops.swiglu_mlp if cfg.mlp == "swiglu" else ops.gelu_mlp
        hidden = g.op(
            "Add",
            [hidden, emit_mlp(g, x, mlp_weights, name=f"{scope}/mlp")],
            name=f"{scope}/mlp_residual",
        )
        presents.append((present_key, present_value))

    if last_logits_only:
        last = g.initializer("last_position", np.array([-1], dtype=np.int64))
        end = g.initializer("sequence_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        axis = g.initializer("sequence_axis", np.array([1], dtype=np.int64))
        hidden = g.op("Slice", [hidden, last, end, axis], name="last_position")
    hidden = _norm(g, cfg, hidden, w, "final_norm", "final_norm")
    logits = ops.lm_head(g, hidden, w["lm_head.weight"], name="lm_head")
    logits_length = 1 if last_logits_only else SEQUENCE
    g.output(logits, "logits", dtype, [BATCH, logits_length, cfg.vocab_size])
    present_shape = [BATCH, kv_heads, TOTAL, head_dim]
    for i, (present_key, present_value) in enumerate(presents):
        g.output(present_key, f"present.{i}.key", dtype, present_shape)
        g.output(present_value, f"present.{i}.value", dtype, present_shape)
    model = g.model(producer_version=__version__)
    model.metadata_props[CONTEXT_KEY] = str(cfg.context_length)
    return model
