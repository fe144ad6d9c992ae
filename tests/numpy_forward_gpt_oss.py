"""NumPy forward pass of GPT-OSS (test side, float64), written from HF's modeling_gpt_oss.py.

Attention: Llama's (q/k/v/o biases, split-halves RoPE with yarn, sliding layers from
``layer_types``) with a learned sink per head: each row's softmax runs over the kept keys'
scores and ``sinks[h]``, and the sink's share is dropped. MLP: router ``x Wᵀ + b``, softmax
over the top-k logits, each chosen expert ``(clip(up, ±L) + 1) · g σ(α g)`` with ``g =
min(gate, L)`` where gate/up are the even/odd columns of ``x gate_up_proj[e] + bias``.
The MoE comes from ``tests/numpy_moe.py`` (``gpt_oss_moe``). ``router_margins`` gives, per
token, the gap between the k-th and (k+1)-th router logit (what makes a top-k choice robust).
"""

import math

import numpy as np
import numpy_forward as nf
import numpy_reference as ref


def sinks_attention(q, k, v, keep, sinks, scale):
    """q [B, H, S, D], k/v [B, Hkv, T, D], keep [B, 1, S, T] → [B, H, S, D]; a row with no
    kept key is all sink (zero)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("bhsd,bhtd->bhst", q, k) * scale
    scores = np.where(np.broadcast_to(keep, scores.shape), scores, -np.inf)
    sink = np.broadcast_to(sinks[None, :, None, None], (*scores.shape[:3], 1))
    combined = np.concatenate([scores, sink], axis=-1)
    weights = np.exp(combined - combined.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhst,bhtd->bhsd", weights[..., :-1], v)


def router_logits(w, prefix, x):
    """[N, E] router logits of ``x [N, C]`` (torch Linear with bias)."""
    return nf._linear(x, w[prefix + "router.weight"], w[prefix + "router.bias"])


def router_margins(logits, top_k):
    """Per token: k-th largest minus (k+1)-th largest router logit (the selection score)."""
    ordered = -np.sort(-logits, axis=-1)
    return ordered[:, top_k - 1] - ordered[:, top_k]


def moe(w, prefix, x, config):
    """The MoE block on ``x [N, C]``: ``numpy_moe.gpt_oss_moe`` (written from the routing
    definitions, fed HF's fused tensors)."""
    import numpy_moe  # imported where used: the attention helpers above do not need it

    return numpy_moe.gpt_oss_moe(w, prefix, x, config)


def gpt_oss_forward(w, config, input_ids, attention_mask, position_ids, past, margins=None):
    """Logits [B, S, V] and presents [(key, value) [B, Hkv, T, D]]; ``margins`` (a list)
    collects each layer's router margins of every token."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps = config.get("rms_norm_eps", 1e-5)
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    seq_len = int(position_ids.max()) + 1
    hidden = w["model.embed_tokens.weight"][input_ids]
    batch, queries, width = hidden.shape
    presents = []
    for i in range(layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        x = ref.rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
        q, k, v = (_proj(x, w, a, part) for part in "qkv")
        q, k, v = nf._heads(q, heads), nf._heads(k, kv_heads), nf._heads(v, kv_heads)
        inv_freq, factor = nf._rope_for(config, head_dim, types[i], seq_len)
        q = nf._rope_apply(q, position_ids, inv_freq, factor, False)
        k = nf._rope_apply(k, position_ids, inv_freq, factor, False)
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        window = config["sliding_window"] if types[i] == "sliding_attention" else None
        keep = nf._keep(attention_mask, queries, window)
        attn = sinks_attention(q, k_all, v_all, keep, w[a + "sinks"], 1 / math.sqrt(head_dim))
        hidden = hidden + nf._linear(nf._merge(attn), w[a + "o_proj.weight"], w[a + "o_proj.bias"])
        x = ref.rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
        flat = x.reshape(-1, width)
        if margins is not None:
            logits = router_logits(w, p + "mlp.", flat)
            margins.append(router_margins(logits, config["num_experts_per_tok"]))
        hidden = hidden + moe(w, p + "mlp.", flat, config).reshape(batch, queries, width)
    hidden = ref.rms_norm(hidden, w["model.norm.weight"], eps)
    head = (
        w["model.embed_tokens.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    )
    return hidden @ head.T, presents


def _proj(x, w, a, part):
    return nf._linear(x, w[f"{a}{part}_proj.weight"], w.get(f"{a}{part}_proj.bias"))


nf.FAMILIES["gpt_oss"] = {"forward": gpt_oss_forward}
