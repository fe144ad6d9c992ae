"""NumPy forward passes (test side only) of Mixtral, Qwen2-MoE and Qwen3-MoE from HF-named
weights, float64, written from transformers' modeling_{mixtral,qwen2_moe,qwen3_moe}.py.

Attention is numpy_forward's Llama attention (the helpers of that module: GQA, split-halves
RoPE, q/k/v biases where the checkpoint has them, Qwen3-MoE's RMS q/k norm per head before
RoPE). Windows as transformers applies them: Mixtral's ``sliding_window`` on every layer,
Qwen2-MoE's ``layer_types``, Qwen3-MoE's ``sliding_window`` on every layer when
``use_sliding_window``. MLPs: Qwen's sparse-layer rule (``num_experts > 0``,
``(i + 1) % decoder_sparse_step == 0``, ``i`` not in ``mlp_only_layers``; else a SwiGLU of
``intermediate_size``); Mixtral is sparse everywhere.

The MoE itself is ``numpy_moe.moe_reference`` (written from the routing definitions, graph
layout ``[in, out]``): the HF torch-layout tensors (router ``gate [E, C]``, experts
``w1/w3/w2`` or ``gate_proj/up_proj/down_proj``, ``shared_expert``, ``shared_expert_gate
[1, C]``) are transposed into its roles here.

``forward`` returns logits ``[B, S, V]`` and presents ``[(key, value) [B, Hkv, T, D]]``.
"""

import math

import numpy as np
import numpy_forward as nf
import numpy_moe
import numpy_reference as ref

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}  # HF → numpy_moe
# HF module names: (MoE module, expert gate / up / down, shared expert, shared gate)
NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), None, None),
    "qwen2_moe": (
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "shared_expert",
        "shared_expert_gate",
    ),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), None, None),
}


def num_experts(config) -> int:
    return config.get("num_local_experts") or config.get("num_experts") or 0


def sparse(config, layer: int) -> bool:
    """Whether layer ``layer`` is a MoE (transformers' decoder-layer rule)."""
    if config["model_type"] == "mixtral":
        return True
    step = config.get("decoder_sparse_step") or 1
    dense = config.get("mlp_only_layers") or []
    return num_experts(config) > 0 and (layer + 1) % step == 0 and layer not in dense


def window(config, layer: int):
    """The layer's sliding window (positions it attends back), or None."""
    kind = config["model_type"]
    if kind == "mixtral":
        return config.get("sliding_window")
    if kind == "qwen3_moe":
        return config.get("sliding_window") if config.get("use_sliding_window") else None
    types = config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    return config.get("sliding_window") if types[layer] == "sliding_attention" else None


def moe_roles(w, config, layer: int) -> dict:
    """Layer ``layer``'s MoE tensors in numpy_moe's graph-layout roles (``router.weight``
    ``[C, E]``, ``experts.{e}.gate_weight`` ``[C, I]`` ...)."""
    module, (gate, up, down), shared, shared_gate = NAMES[config["model_type"]]
    m = f"model.layers.{layer}.{module}."
    roles = {"router.weight": w[m + "gate.weight"].T}
    for e in range(num_experts(config)):
        for role, name in (("gate", gate), ("up", up), ("down", down)):
            roles[f"experts.{e}.{role}_weight"] = w[f"{m}experts.{e}.{name}.weight"].T
    if shared is not None:
        for role in ("gate", "up", "down"):
            roles[f"shared.{role}_weight"] = w[f"{m}{shared}.{role}_proj.weight"].T
        roles["shared_gate.weight"] = w[f"{m}{shared_gate}.weight"].T
    return roles


def moe_spec(config) -> dict:
    """The MoE's routing facts for numpy_moe: softmax top-k, renormalized for Mixtral and
    when ``norm_topk_prob``."""
    return {
        "num_experts": num_experts(config),
        "top_k": config["num_experts_per_tok"],
        "scores": "softmax",
        "normalize": config["model_type"] == "mixtral" or bool(config.get("norm_topk_prob")),
        "activation": ACTIVATIONS[config.get("hidden_act", "silu")],
    }


def _mlp(w, config, layer: int, x):
    """x [B, S, C] → the layer's MLP output [B, S, C]."""
    if not sparse(config, layer):
        m = f"model.layers.{layer}.mlp."
        act = nf.ACT[config.get("hidden_act", "silu")]
        gate = nf._linear(x, w[m + "gate_proj.weight"])
        up = nf._linear(x, w[m + "up_proj.weight"])
        return nf._linear(act(gate) * up, w[m + "down_proj.weight"])
    flat = x.reshape(-1, x.shape[-1])
    out = numpy_moe.moe_reference(flat, moe_roles(w, config, layer), **moe_spec(config))
    return out.reshape(x.shape)


def forward(w, config, input_ids, attention_mask, position_ids, past):
    """Embeddings → layers (RMS norm, attention, RMS norm, MLP or MoE) → final norm → logits."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps = config.get("rms_norm_eps", 1e-6)
    qk_norm = config["model_type"] == "qwen3_moe"
    seq_len = int(position_ids.max()) + 1
    inv_freq, factor = nf._rope_for(config, head_dim, None, seq_len)
    hidden = w["model.embed_tokens.weight"][input_ids]
    presents = []
    for i in range(config["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        x = ref.rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
        q, k, v = (
            nf._linear(x, w[f"{a}{part}_proj.weight"], w.get(f"{a}{part}_proj.bias"))
            for part in "qkv"
        )
        q, k, v = nf._heads(q, heads), nf._heads(k, kv_heads), nf._heads(v, kv_heads)
        if qk_norm:
            q = ref.rms_norm(q, w[a + "q_norm.weight"], eps)
            k = ref.rms_norm(k, w[a + "k_norm.weight"], eps)
        q = nf._rope_apply(q, position_ids, inv_freq, factor, False)
        k = nf._rope_apply(k, position_ids, inv_freq, factor, False)
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        keep = ref.keep_mask(
            attention_mask, input_ids.shape[1], causal=True, window=window(config, i)
        )
        attended = np.nan_to_num(ref.attention(q, k_all, v_all, keep, 1 / math.sqrt(head_dim)))
        hidden = hidden + nf._linear(
            nf._merge(attended), w[a + "o_proj.weight"], w.get(a + "o_proj.bias")
        )
        x = ref.rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
        hidden = hidden + _mlp(w, config, i, x)
    hidden = ref.rms_norm(hidden, w["model.norm.weight"], eps)
    tied = config.get("tie_word_embeddings", False)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T, presents


for _family in FAMILIES:
    nf.FAMILIES[_family] = {"forward": forward}
