"""NumPy forward passes of Phi-3, Phi-1/2, Granite, StableLM and Nemotron, written from HF's
modeling code (float64): registered in ``numpy_forward.FAMILIES``.

Phi-3 splits its fused ``qkv_proj`` / ``gate_up_proj`` rows into Llama's names and applies
Phi3Config's RoPE renaming; Phi-2 is its own loop (one shared LayerNorm, parallel residual,
per-head LayerNorm of q/k); the rest are Llama-shaped dicts of differences with the config's
defaults filled in as their HF configs fill them.
"""

import math

import numpy as np
import numpy_forward as nf
import numpy_reference as ref


def _with_partial(config, default):
    """The config with ``partial_rotary_factor`` at the top level (rope_parameters' first),
    defaulting as the family's HF config does."""
    params = config.get("rope_parameters") or {}
    value = params.get("partial_rotary_factor", config.get("partial_rotary_factor", default))
    return {**config, "partial_rotary_factor": value}


# ------------------------------------------------------------------------------ Phi-3
def _phi3_config(config):
    fixed = dict(config)
    fixed.setdefault("original_max_position_embeddings", 4096)
    for key in ("rope_scaling", "rope_parameters"):
        params = fixed.get(key)
        if isinstance(params, dict):
            params = dict(params)
            kind = params.get("rope_type", params.get("type"))
            if kind in ("su", "yarn"):
                params["rope_type"] = "longrope"
            params.pop("type", None)
            fixed[key] = params
    return fixed


def phi3_forward(w, config, input_ids, attention_mask, position_ids, past):
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    f = config["intermediate_size"]
    split = dict(w)
    for i in range(config["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv = split.pop(a + "qkv_proj.weight")
        q, kv = heads * head_dim, kv_heads * head_dim
        split[a + "q_proj.weight"] = qkv[:q]
        split[a + "k_proj.weight"] = qkv[q : q + kv]
        split[a + "v_proj.weight"] = qkv[q + kv :]
        gate_up = split.pop(m + "gate_up_proj.weight")
        split[m + "gate_proj.weight"], split[m + "up_proj.weight"] = gate_up[:f], gate_up[f:]
    family = {"all_sliding": True}  # Phi3Model: one sliding mask for every layer when set
    return nf.llama_like_forward(
        split, _phi3_config(config), input_ids, attention_mask, position_ids, past, family
    )


# ------------------------------------------------------------------------------ Phi-1/2
def phi_forward(w, config, input_ids, attention_mask, position_ids, past):
    config = _with_partial(config, 0.5)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps = config.get("layer_norm_eps", 1e-5)
    act = nf.ACT[config.get("hidden_act", "gelu_new")]
    seq_len = int(position_ids.max()) + 1
    inv_freq, factor = nf._rope_for(config, head_dim, None, seq_len)
    keep = nf._keep(attention_mask, input_ids.shape[1], None)
    hidden = w["model.embed_tokens.weight"][input_ids]
    presents = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        x = ref.layer_norm(
            hidden, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps
        )
        q, k, v = (nf._linear(x, w[f"{a}{t}_proj.weight"], w[f"{a}{t}_proj.bias"]) for t in "qkv")
        q, k, v = nf._heads(q, heads), nf._heads(k, kv_heads), nf._heads(v, kv_heads)
        if config.get("qk_layernorm"):
            q = ref.layer_norm(q, w[a + "q_layernorm.weight"], w[a + "q_layernorm.bias"], eps)
            k = ref.layer_norm(k, w[a + "k_layernorm.weight"], w[a + "k_layernorm.bias"], eps)
        q = nf._rope_apply(q, position_ids, inv_freq, factor, False)
        k = nf._rope_apply(k, position_ids, inv_freq, factor, False)
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        mixed = np.nan_to_num(ref.attention(q, k_all, v_all, keep, 1 / math.sqrt(head_dim)))
        attended = nf._linear(nf._merge(mixed), w[a + "dense.weight"], w[a + "dense.bias"])
        m = p + "mlp."
        fc = nf._linear(x, w[m + "fc1.weight"], w[m + "fc1.bias"])
        fed = nf._linear(act(fc), w[m + "fc2.weight"], w[m + "fc2.bias"])
        hidden = hidden + attended + fed
    hidden = ref.layer_norm(
        hidden, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"], eps
    )
    tied = config.get("tie_word_embeddings", False)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T + w["lm_head.bias"], presents


# ----------------------------------------------------------------------- Llama-shaped
GRANITE = {
    "embed_scale": lambda c: c.get("embedding_multiplier", 1.0),
    "scale": lambda c, head_dim: c.get("attention_multiplier", 1.0),
    "residual_scale": lambda c: c.get("residual_multiplier", 1.0),
    "logit_scale": lambda c: 1.0 / c.get("logits_scaling", 1.0),
}

NEMOTRON = {
    "norm": "layer",
    "norm_offset": 1.0,
    "eps_key": "norm_eps",
    "mlp": "plain",
    "mlp_names": ("up_proj", "down_proj"),
}


def nemotron_forward(w, config, *args):
    config = {"norm_eps": 1e-5, **_with_partial(config, 0.5)}
    return nf.llama_like_forward(w, config, *args, NEMOTRON)


def stablelm_forward(w, config, *args):
    config = _with_partial(config, 0.25)
    config = {"layer_norm_eps": 1e-5, **config}
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    family = {
        "norm": "layer",
        "eps_key": "layer_norm_eps",
        "parallel": bool(config.get("use_parallel_residual")),
    }
    return nf.llama_like_forward(w, config, *args, family)


nf.FAMILIES["phi3"] = {"forward": phi3_forward}
nf.FAMILIES["phi"] = {"forward": phi_forward}
nf.FAMILIES["granite"] = GRANITE
nf.FAMILIES["nemotron"] = {"forward": nemotron_forward}
nf.FAMILIES["stablelm"] = {"forward": stablelm_forward}
