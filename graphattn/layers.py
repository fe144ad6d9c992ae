"""The pieces a decoder layer is made of: norms, attention, MLP, and the residual form.

Each piece reads its :mod:`graphattn.spec` value and the weight roles that exist: a norm scale,
a bias or a post-norm appears because its role is in the plan, never because of a flag.
Weight roles (per layer ``layers.{i}.``): ``attn_norm``, ``post_attn_norm``, ``mlp_norm``,
``post_mlp_norm`` (``.weight`` / ``.bias``); ``q``, ``k``, ``v``, ``o`` (``.weight [in, out]``,
``.bias``); ``q_norm``, ``k_norm`` (``.weight``, ``.bias``); ``mlp.gate_weight``,
``mlp.up_weight``, ``mlp.down_weight`` (gated) or ``mlp.fc_weight``, ``mlp.proj_weight``
(plain), each with an optional ``..._bias``. A ``native_sparse`` layer
(:class:`~graphattn.spec.SparseSpec`, :mod:`graphattn.ops.sparse_block`) also has its gates:
``gate_coarse``, ``gate_fine``, ``gate_window`` (``[num_heads]`` logits, gates ``head``) or
``gate.weight [hidden, 3·num_heads]`` (+ ``gate.bias``; gates ``token``, columns coarse |
fine | window); a ``sparse_routed`` layer has no extra weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn import ops
from graphattn.ops import GraphEmitter
from graphattn.ops.attention import Softcap
from graphattn.ops.attention_block import self_attention_block
from graphattn.ops.mla import expand_threshold, latent_attention_block
from graphattn.ops.moe import moe_block
from graphattn.ops.sparse_block import HEAD_GATES, sparse_attention_block
from graphattn.spec import AttentionSpec, LayerSpec, MlpSpec, NormSpec


class Weights:
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

    def roles_under(self, prefix: str) -> set[str]:
        """The roles that start with ``prefix``, without it (``{"fc_weight", ...}``)."""
        return {r.removeprefix(prefix) for r in self._tensors if r.startswith(prefix)}

    def get(self, role: str) -> ir.Value | None:
        return self[role] if role in self else None

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A shared graph constant (made once per name)."""
        if name not in self._values:
            self._values[name] = self._g.initializer(name, array)
        return self._values[name]


@dataclass(frozen=True)
class LayerInputs:
    """What every layer reads besides its weights: the attention bias per (causal, window)
    (None for sparse layers, which read the mask), the cos/sin per RoPE key, and this layer's
    past cache tensors in :attr:`~graphattn.spec.AttentionSpec.cache` order (key/value ``[B,
    Hkv, P, D]``, or the latent ``[B, P, kv_lora_rank]`` and rope key ``[B, P,
    qk_rope_head_dim]``). Sparse layers also read ``attention_mask [B, T]`` and (routed)
    ``cos_sin_all [B, T, R]``: the RoPE tables of every slot, past and new."""

    bias: ir.Value | None
    cos_sin: tuple[ir.Value, ir.Value] | None
    pasts: tuple[ir.Value, ...]
    attention_mask: ir.Value | None = None
    cos_sin_all: tuple[ir.Value, ir.Value] | None = None


def scaled(g: GraphEmitter, w: Weights, x: ir.Value, factor: float | None, name: str):
    """``x * factor`` (a constant cast to x's type), or x itself when factor is None."""
    if factor is None:
        return x
    constant = w.constant(f"{name}.factor", np.array(factor, dtype=np.float32))
    return g.op("Mul", [x, g.op("CastLike", [constant, x], name=f"{name}/cast")], name=name)


def norm(
    g: GraphEmitter, spec: NormSpec, x: ir.Value, w: Weights, role: str, name: str, width: int
):
    """RMSNorm or LayerNorm of ``x [..., width]``; a scale or bias absent from the plan is the
    identity (a LayerNorm without them is OLMo's non-parametric norm): a constant of ones or
    zeros, cast to x's type."""
    weight, bias = w.get(f"{role}.weight"), w.get(f"{role}.bias")
    if weight is None:
        ones = w.constant(f"norm.ones_{width}", np.ones(width, np.float32))
        weight = g.op("CastLike", [ones, x], name=f"{name}/unit_scale")
    if spec.kind == "rms":
        if bias is not None:
            raise ValueError(f"{role}: an RMS norm has no bias")
        return ops.rms_norm(g, x, weight, epsilon=spec.epsilon, name=name)
    if bias is None:
        zeros = w.constant(f"norm.zeros_{width}", np.zeros(width, np.float32))
        bias = g.op("CastLike", [zeros, x], name=f"{name}/zero_bias")
    return ops.layer_norm(g, x, weight, bias, epsilon=spec.epsilon, name=name)


def attention(
    g: GraphEmitter,
    spec: AttentionSpec,
    x: ir.Value,
    w: Weights,
    prefix: str,
    io: LayerInputs,
    scope: str,
) -> tuple[ir.Value, ...]:
    """One semantic attention block (:mod:`graphattn.ops.attention_block`, or
    :mod:`graphattn.ops.mla` when ``spec.latent``): ``(output, *presents)`` with the presents
    in ``spec.cache`` order."""
    if spec.latent is not None:
        return latent_attention(g, spec, x, w, prefix, io, scope)
    if spec.sparse is not None:
        return sparse_attention(g, spec, x, w, prefix, io, scope)
    weights = _part_weights(w, prefix, ("q", "k", "v", "o", "q_norm", "k_norm"))
    if spec.sinks or f"{prefix}sinks" in w:  # attention sinks [H] (GPT-OSS)
        weights["sinks"] = w[f"{prefix}sinks"]
    qk_norm = "none"
    if spec.qk_norm is not None:
        qk_norm = f"{spec.qk_norm.kind}_{spec.qk_norm_scope}"
    return self_attention_block(
        g,
        x,
        weights,
        bias_B1ST=io.bias,
        **_heads_and_pasts(spec, io),
        softcap=spec.softcap,
        window=spec.window,
        **_rope_arguments(spec, io.cos_sin),
        qk_norm=qk_norm,
        qk_norm_epsilon=spec.qk_norm.epsilon if spec.qk_norm is not None else 1e-6,
        clip_qkv=spec.clip_qkv,
        alibi=spec.alibi_slopes is not None,
        name=f"{scope}/attn",
    )


def latent_attention(
    g: GraphEmitter,
    spec: AttentionSpec,
    x: ir.Value,
    w: Weights,
    prefix: str,
    io: LayerInputs,
    scope: str,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Multi-head latent attention (:mod:`graphattn.ops.mla`): ``(output [B, S, C],
    present_latent [B, T, kv_lora_rank], present_rope_key [B, T, qk_rope_head_dim])``."""
    lat = spec.latent
    if spec.rope is None or io.cos_sin is None:
        raise ValueError(
            f"{prefix}: latent attention needs RoPE on qk_rope_head_dim={lat.qk_rope_head_dim}"
        )
    if lat.norm.kind != "rms":
        raise ValueError(f"{prefix}: latent attention norm must be rms, got {lat.norm.kind!r}")
    roles = ("q", "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm", "k_up", "v_up", "o")
    weights = {f"{r}_weight": w[f"{prefix}{r}.weight"] for r in roles if f"{prefix}{r}.weight" in w}
    biases = sorted(f"{prefix}{r}.bias" for r in roles if f"{prefix}{r}.bias" in w)
    if biases:
        raise ValueError(f"latent attention has no projection biases, the plan has {biases}")
    return latent_attention_block(
        g,
        x,
        weights,
        bias_B1ST=io.bias,
        past_latent_BPR=io.pasts[0],
        past_rope_key_BPP=io.pasts[1],
        cos_sin=io.cos_sin,
        num_heads=spec.num_heads,
        kv_lora_rank=lat.kv_lora_rank,
        qk_nope_head_dim=lat.qk_nope_head_dim,
        qk_rope_head_dim=lat.qk_rope_head_dim,
        v_head_dim=lat.v_head_dim,
        q_lora_rank=lat.q_lora_rank,
        scale=spec.effective_scale,
        epsilon=lat.norm.epsilon,
        rope="interleaved" if spec.rope.interleaved else "halves",
        form=lat.form,
        window=spec.window,
        # absorbed: a prefill long enough that expanding needs fewer FLOPs expands
        expand_from=0
        if lat.form != "absorbed"
        else expand_threshold(lat.kv_lora_rank, lat.qk_nope_head_dim, lat.v_head_dim),
        name=f"{scope}/attn",
    )


def sparse_attention(
    g: GraphEmitter,
    spec: AttentionSpec,
    x: ir.Value,
    w: Weights,
    prefix: str,
    io: LayerInputs,
    scope: str,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Native sparse or sparse routed attention (:mod:`graphattn.ops.sparse_block`):
    ``(output [B, S, C], present_key, present_value [B, Hkv, T, D])``; a routed layer's
    present key is before RoPE."""
    sp = spec.sparse
    weights = _part_weights(w, prefix, ("q", "k", "v", "o", "gate"))
    for role in HEAD_GATES:
        if f"{prefix}{role}" in w:
            weights[role] = w[f"{prefix}{role}"]
    if io.attention_mask is None:
        raise ValueError(f"{prefix}: sparse attention needs the attention_mask")
    routed = sp.kind == "sparse_routed"
    cos_sin = io.cos_sin_all if routed else io.cos_sin
    if spec.rope is not None and cos_sin is None:
        raise ValueError(f"{prefix}: {sp.kind} attention needs its RoPE tables")
    return sparse_attention_block(
        g,
        x,
        weights,
        kind=sp.kind,
        attention_mask_BT=io.attention_mask,
        **_heads_and_pasts(spec, io),
        block_size=sp.block_size,
        top_blocks=sp.top_blocks,
        top_tokens=sp.top_tokens,
        window=sp.window,
        selection=sp.selection,
        gates=sp.gates,
        **_rope_arguments(spec, cos_sin if spec.rope is not None else None),
        name=f"{scope}/attn",
    )


def _part_weights(w: Weights, prefix: str, parts: tuple[str, ...]) -> dict[str, ir.Value]:
    """``{part}_weight`` / ``{part}_bias`` for each of ``parts`` that the layer has."""
    weights = {}
    for part in parts:
        for kind in ("weight", "bias"):
            if f"{prefix}{part}.{kind}" in w:
                weights[f"{part}_{kind}"] = w[f"{prefix}{part}.{kind}"]
    return weights


def _heads_and_pasts(spec: AttentionSpec, io: LayerInputs) -> dict[str, object]:
    """The attention block arguments for the KV cache, the heads and the scale."""
    return {
        "past_key_BKPD": io.pasts[0],
        "past_value_BKPD": io.pasts[1],
        "num_heads": spec.num_heads,
        "kv_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "scale": spec.effective_scale,
    }


def _rope_arguments(spec: AttentionSpec, cos_sin) -> dict[str, object]:
    """``rope`` (none / halves / interleaved), ``cos_sin`` and ``rotary_dim`` of a block call."""
    rope = spec.rope
    return {
        "rope": "none" if rope is None else ("interleaved" if rope.interleaved else "halves"),
        "cos_sin": cos_sin,
        "rotary_dim": 0 if rope is None else rope.rotary_dim,
    }


def _activation(g: GraphEmitter, kind: str, x: ir.Value, name: str) -> ir.Value:
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], name=f"{name}/sigmoid")], name=name)
    if kind in ("gelu", "gelu_tanh"):
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        return g.op("Gelu", [x], {"approximate": approximate}, name=name)
    relu = g.op("Relu", [x], name=name if kind == "relu" else f"{name}/relu")
    return relu if kind == "relu" else g.op("Mul", [relu, relu], name=name)


def _linear(g: GraphEmitter, x: ir.Value, w: Weights, role: str, name: str) -> ir.Value:
    y = g.op("MatMul", [x, w[f"{role}_weight"]], name=name)
    if f"{role}_bias" in w:
        y = g.op("Add", [y, w[f"{role}_bias"]], name=f"{name}/bias")
    return y


def mlp(g: GraphEmitter, spec: MlpSpec, x: ir.Value, w: Weights, prefix: str, scope: str):
    """The feed-forward block; SwiGLU and GPT-2's GELU MLP keep their own functions."""
    roles, m = w.roles_under(prefix), prefix
    if spec.kind == "moe":
        moe = spec.moe
        return moe_block(
            g,
            x,
            {r: w[f"{m}{r}"] for r in sorted(roles)},
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            scores=moe.scores,
            normalize=moe.normalize,
            scaling=moe.scaling,
            groups=moe.groups,
            topk_groups=moe.topk_groups,
            group_score=moe.group_score,
            activation=spec.activation,
            swiglu_limit=moe.swiglu_limit,
            swiglu_alpha=moe.swiglu_alpha,
            name=scope,
        )
    if spec.kind == "gated" and spec.activation == "silu" and not any("bias" in r for r in roles):
        picked = {r: w[f"{m}{r}"] for r in ("gate_weight", "up_weight", "down_weight")}
        return ops.swiglu_mlp(g, x, picked, name=scope)
    if (
        spec.kind == "plain"
        and spec.activation == "gelu_tanh"
        and roles
        == {
            "fc_weight",
            "fc_bias",
            "proj_weight",
            "proj_bias",
        }
    ):
        # a fixed order (not the set's): initializers are made in it, and exports must not
        # depend on the hash seed
        picked = {r: w[f"{m}{r}"] for r in ("fc_weight", "fc_bias", "proj_weight", "proj_bias")}
        return ops.gelu_mlp(g, x, picked, name=scope)
    if spec.kind == "gated":
        gate = _linear(g, x, w, f"{m}gate", f"{scope}/gate")
        up = _linear(g, x, w, f"{m}up", f"{scope}/up")
        act = _activation(g, spec.activation, gate, f"{scope}/act")
        return _linear(
            g, g.op("Mul", [act, up], name=f"{scope}/gated"), w, f"{m}down", f"{scope}/down"
        )
    hidden = _activation(
        g, spec.activation, _linear(g, x, w, f"{m}fc", f"{scope}/fc"), f"{scope}/act"
    )
    return _linear(g, hidden, w, f"{m}proj", f"{scope}/proj")


def decoder_layer(
    g: GraphEmitter,
    spec: LayerSpec,
    hidden: ir.Value,
    w: Weights,
    index: int,
    io: LayerInputs,
    hidden_size: int,
) -> tuple[ir.Value, tuple[ir.Value, ...]]:
    """One layer: returns ``(hidden [B, S, C], presents)``, the presents in the layer's
    ``AttentionSpec.cache`` order (``present_key, present_value`` or ``present_latent,
    present_rope_key``)."""
    scope, prefix = f"layers.{index}", f"layers.{index}."

    def normed(place: str, x: ir.Value) -> ir.Value:
        if place not in spec.norms:
            return x
        return norm(g, spec.norms[place], x, w, f"{prefix}{place}", f"{scope}/{place}", hidden_size)

    def add(a: ir.Value, branch: ir.Value, name: str) -> ir.Value:
        branch = scaled(g, w, branch, spec.residual_scale, f"{scope}/{name}_scale")
        return g.op("Add", [a, branch], name=f"{scope}/{name}")

    x = normed("attn_norm", hidden)
    attended, *presents = attention(g, spec.attention, x, w, prefix, io, scope)
    attended = normed("post_attn_norm", attended)
    if spec.residual == "parallel":
        mlp_in = normed("mlp_norm", hidden) if "mlp_norm" in spec.norms else x
        fed = normed("post_mlp_norm", mlp(g, spec.mlp, mlp_in, w, f"{prefix}mlp.", f"{scope}/mlp"))
        both = g.op("Add", [attended, fed], name=f"{scope}/parallel")
        return add(hidden, both, "residual"), tuple(presents)
    hidden = add(hidden, attended, "attn_residual")
    fed = mlp(g, spec.mlp, normed("mlp_norm", hidden), w, f"{prefix}mlp.", f"{scope}/mlp")
    hidden = add(hidden, normed("post_mlp_norm", fed), "mlp_residual")
    return hidden, tuple(presents)


def final_logits(g: GraphEmitter, hidden: ir.Value, w: Weights, cfg) -> ir.Value:
    """Final norm, output projection, then the logit scale and softcap where the config has them."""
    hidden = norm(g, cfg.final_norm, hidden, w, "final_norm", "final_norm", cfg.hidden_size)
    logits = ops.lm_head(g, hidden, w["lm_head.weight"], name="lm_head")
    if "lm_head.bias" in w:
        logits = g.op("Add", [logits, w["lm_head.bias"]], name="lm_head/bias")
    logits = scaled(g, w, logits, cfg.logit_scale, "logit_scale")
    if cfg.final_softcap is not None:
        logits = g.call(
            Softcap, [logits], {"softcap": float(cfg.final_softcap)}, name="final_softcap"
        )
    return logits
