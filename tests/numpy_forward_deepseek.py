"""NumPy forward passes (test side only) of DeepSeek-V2 and DeepSeek-V3 from HF-named
weights, float64, written from transformers' modeling_deepseek_v2.py / modeling_deepseek_v3.py.

Attention is MLA in HF's expanded form: the latent ``c = rms(kv_a(x)[:r])`` and the rope key
``kv_a(x)[r:]`` are cached, and every call expands the whole cached latent through
``kv_b_proj`` into per-head ``k_nope`` / ``v`` (keys ``[k_nope | rope key]`` shared by the
heads). RoPE on the rope part: V2 as complex multiplication of the pairs ``(x0, x1), ...``;
V3 with ``rope_interleave`` as HF computes it (rotated evens, then rotated odds: a fixed
permutation of the same channels for queries and keys, so the scores are the pairs' rotation),
else split halves. Score scale ``qk_head_dim^-0.5 · mscale(factor, mscale_all_dim)²``.

The MoE layers run through ``numpy_moe.moe_reference`` (written from the routing definitions,
graph-layout roles): HF's torch-layout names are converted and the config's routing read here
(:func:`moe_roles`, :func:`moe_spec`).

``forward`` returns logits ``[B, S, V]`` and presents ``[(latent [B, T, kv_lora_rank],
rope_key [B, T, qk_rope_head_dim])]`` per layer, the rope key rotated with its pairs in place
(``(x0, x1)`` of each frequency adjacent: the layout the interleaved RoPE keeps).
"""

import math

import numpy as np
import numpy_forward
import numpy_reference as ref

LATENT_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: DeepseekV2RMSNorm's default eps


def _lin(x, weight):  # torch layout [out, in]
    return x @ weight.T


def _silu(x):
    return x / (1 + np.exp(-x))


def _score_scale(config, qk_head_dim):
    scale = qk_head_dim**-0.5
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    if params.get("rope_type", params.get("type", "default")) == "default":
        return scale
    m_all = params.get("mscale_all_dim")
    if m_all:
        factor = params["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * m_all * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def _angles(position_ids, inv_freq):  # [B, S] -> [B, 1, S, R]
    return position_ids[:, None, :, None].astype(np.float64) * inv_freq


def _rope_v2(x, angles, factor):
    """Complex multiplication of the pairs (x0, x1), (x2, x3), ... (HF apply_rotary_emb);
    output pairs in place."""
    pairs = x[..., 0::2] + 1j * x[..., 1::2]
    turned = pairs * np.exp(1j * angles) * factor
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = turned.real, turned.imag
    return out


def _rope_v3_interleave(x, angles, factor):
    """HF apply_rotary_pos_emb_interleave: [evens·cos − odds·sin | odds·cos + evens·sin]."""
    cos, sin = np.cos(angles) * factor, np.sin(angles) * factor
    even, odd = x[..., 0::2], x[..., 1::2]
    return np.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)


def _rope_halves(x, angles, factor):
    """HF apply_rotary_pos_emb (rotate_half) with cos/sin = cat(freqs, freqs)."""
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1) * factor
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1) * factor
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _pairs_in_place(x):
    """[evens | odds] → evens and odds interleaved again."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x[..., :half], x[..., half:]
    return out


def _mla(w, config, a, x, position_ids, past, keep, version):
    """One MLA block: x [B, S, C] → out [B, S, C], (latent, rope key) after this call."""
    b, s, _ = x.shape
    heads = config["num_attention_heads"]
    nope, rope = config["qk_nope_head_dim"], config["qk_rope_head_dim"]
    r, v_dim = config["kv_lora_rank"], config["v_head_dim"]
    if config.get("q_lora_rank") is None:
        q = _lin(x, w[a + "q_proj.weight"])
    else:
        q_a = ref.rms_norm(
            _lin(x, w[a + "q_a_proj.weight"]), w[a + "q_a_layernorm.weight"], LATENT_EPS
        )
        q = _lin(q_a, w[a + "q_b_proj.weight"])
    q = q.reshape(b, s, heads, nope + rope).transpose(0, 2, 1, 3)  # [B, H, S, nope+rope]
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    compressed = _lin(x, w[a + "kv_a_proj_with_mqa.weight"])
    latent = ref.rms_norm(compressed[..., :r], w[a + "kv_a_layernorm.weight"], LATENT_EPS)
    k_pe = compressed[..., r:][:, None]  # [B, 1, S, rope]

    seq_len = int(position_ids.max()) + 1
    inv_freq, factor = numpy_forward._rope_for(config, rope, None, seq_len)
    angles = _angles(position_ids, inv_freq)
    interleave = version == 2 or config.get("rope_interleave", True)
    if version == 2:
        q_pe, k_pe = _rope_v2(q_pe, angles, factor), _rope_v2(k_pe, angles, factor)
        cached_pe = k_pe[:, 0]
    elif interleave:
        q_pe = _rope_v3_interleave(q_pe, angles, factor)
        k_pe = _rope_v3_interleave(k_pe, angles, factor)
        cached_pe = _pairs_in_place(k_pe[:, 0])
    else:
        q_pe, k_pe = _rope_halves(q_pe, angles, factor), _rope_halves(k_pe, angles, factor)
        cached_pe = k_pe[:, 0]

    latent_all = np.concatenate([past[0], latent], axis=1)  # [B, T, r]
    pe_all = np.concatenate([past[1], cached_pe], axis=1)  # [B, T, rope] pairs in place
    if version == 3 and interleave:
        pe_keys = np.concatenate([pe_all[..., 0::2], pe_all[..., 1::2]], axis=-1)  # HF's order
    else:
        pe_keys = pe_all
    t = latent_all.shape[1]
    kv = _lin(latent_all, w[a + "kv_b_proj.weight"]).reshape(b, t, heads, nope + v_dim)
    kv = kv.transpose(0, 2, 1, 3)  # [B, H, T, nope+v]
    k_nope, value = kv[..., :nope], kv[..., nope:]
    key = np.concatenate([k_nope, np.broadcast_to(pe_keys[:, None], (b, heads, t, rope))], -1)
    query = np.concatenate([q_nope, q_pe], axis=-1)
    scale = _score_scale(config, nope + rope)
    attended = np.nan_to_num(ref.attention(query, key, value, keep, scale))  # [B, H, S, v]
    merged = attended.transpose(0, 2, 1, 3).reshape(b, s, heads * v_dim)
    return _lin(merged, w[a + "o_proj.weight"]), (latent_all, pe_all)


def _swiglu(w, m, x):
    gate, up = _lin(x, w[m + "gate_proj.weight"]), _lin(x, w[m + "up_proj.weight"])
    return _lin(_silu(gate) * up, w[m + "down_proj.weight"])


def moe_spec(config, version) -> dict:
    """numpy_moe's routing facts for a DeepSeek config, as transformers' routers apply them:
    V2 softmax, top-k of all (``greedy``) or within the ``topk_group`` groups of best single
    score (``group_limited_greedy``), never renormalized; V3 sigmoid, selection with the
    correction bias, groups by the sum of their top 2, renormalized when ``norm_topk_prob``;
    both × ``routed_scaling_factor``."""
    spec = {
        "num_experts": config["n_routed_experts"],
        "top_k": config["num_experts_per_tok"],
        "scaling": config.get("routed_scaling_factor", 1.0),
        "activation": config.get("hidden_act", "silu"),
    }
    if version == 2:
        grouped = config.get("topk_method", "greedy") == "group_limited_greedy"
        spec.update(scores="softmax", normalize=False, group_score="max")
        if grouped:
            spec.update(groups=config["n_group"], topk_groups=config["topk_group"])
    else:
        spec.update(
            scores="sigmoid",
            normalize=config.get("norm_topk_prob", True),
            group_score="top2_sum",
            groups=config.get("n_group") or 1,
            topk_groups=config.get("topk_group") or 1,
        )
    return spec


def moe_roles(w, config, m) -> dict:
    """The MoE tensors under ``m`` (``model.layers.{i}.mlp.``) in numpy_moe's graph-layout
    roles: torch ``[out, in]`` matrices transposed, the V3 correction bias as
    ``router.score_bias``, ``shared_experts`` as ``shared``."""
    roles = {"router.weight": w[m + "gate.weight"].T}
    if m + "gate.e_score_correction_bias" in w:
        roles["router.score_bias"] = w[m + "gate.e_score_correction_bias"]
    for e in range(config["n_routed_experts"]):
        for role in ("gate", "up", "down"):
            roles[f"experts.{e}.{role}_weight"] = w[f"{m}experts.{e}.{role}_proj.weight"].T
    for role in ("gate", "up", "down"):
        roles[f"shared.{role}_weight"] = w[f"{m}shared_experts.{role}_proj.weight"].T
    return roles


def _moe(w, config, m, x, version):
    import numpy_moe  # imported where used: other families' forwards do not need it

    flat = x.reshape(-1, x.shape[-1])
    out = numpy_moe.moe_reference(flat, moe_roles(w, config, m), moe_spec(config, version))
    return out.reshape(x.shape)


def _forward(version):
    def run(w, config, input_ids, attention_mask, position_ids, past):
        eps = config.get("rms_norm_eps", 1e-6)
        dense = config.get("first_k_dense_replace") or 0
        keep = ref.keep_mask(attention_mask, input_ids.shape[1], causal=True, window=None)
        hidden = w["model.embed_tokens.weight"][input_ids]
        presents = []
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = ref.rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
            out, present = _mla(
                w, config, p + "self_attn.", x, position_ids, past[i], keep, version
            )
            presents.append(present)
            hidden = hidden + out
            x = ref.rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
            if i < dense:
                hidden = hidden + _swiglu(w, p + "mlp.", x)
            else:
                hidden = hidden + _moe(w, config, p + "mlp.", x, version)
        hidden = ref.rms_norm(hidden, w["model.norm.weight"], eps)
        tied = config.get("tie_word_embeddings", False)
        head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
        return hidden @ head.T, presents

    return run


numpy_forward.FAMILIES["deepseek_v2"] = {"forward": _forward(2)}
numpy_forward.FAMILIES["deepseek_v3"] = {"forward": _forward(3)}
