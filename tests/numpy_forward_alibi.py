"""NumPy forward passes of the ALiBi families (Bloom, MPT, Falcon), written from HF's math:
registered in ``numpy_forward.FAMILIES``."""

import math

import numpy as np
import numpy_forward as nf
import numpy_reference as ref


def bloom_slopes(heads):
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(closest, heads - closest))]
    return np.array(slopes)


def _alibi_attention(q, k, v, keep, scale, slopes, attention_mask):
    """softmax(scale q kᵀ + slope_h · key position) v, loops over heads, float64."""
    b, h, s, d = q.shape
    t = k.shape[2]
    positions = (np.cumsum(attention_mask, axis=1) - 1) * attention_mask  # [B, T]
    out = np.zeros((b, h, s, v.shape[-1]))
    group = h // k.shape[1]
    for bi in range(b):
        for hi in range(h):
            kv = hi // group
            scores = scale * q[bi, hi] @ k[bi, kv].T + slopes[hi] * positions[bi][None, :t]
            scores = np.where(keep[bi, 0], scores, -np.inf)
            top = scores.max(-1, keepdims=True)
            probs = np.exp(scores - np.where(np.isfinite(top), top, 0))
            total = probs.sum(-1, keepdims=True)
            out[bi, hi] = np.where(total > 0, probs / np.where(total > 0, total, 1), 0) @ v[bi, kv]
    return out


def bloom_forward(w, config, input_ids, attention_mask, position_ids, past):
    heads = config["n_head"]
    hidden_size = config["hidden_size"]
    head_dim = hidden_size // heads
    eps = config.get("layer_norm_epsilon", 1e-5)
    slopes = bloom_slopes(heads)
    t = "transformer."
    hidden = w[t + "word_embeddings.weight"][input_ids]
    hidden = ref.layer_norm(
        hidden,
        w[t + "word_embeddings_layernorm.weight"],
        w[t + "word_embeddings_layernorm.bias"],
        eps,
    )
    keep = ref.keep_mask(attention_mask, input_ids.shape[1], causal=True, window=None)
    presents = []
    for i in range(config["n_layer"]):
        p = f"{t}h.{i}."
        x = ref.layer_norm(
            hidden, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps
        )
        fused = x @ w[p + "self_attention.query_key_value.weight"].T
        fused = fused + w[p + "self_attention.query_key_value.bias"]
        b, s, _ = fused.shape
        fused = fused.reshape(b, s, heads, 3, head_dim)
        q, k, v = (fused[..., j, :].transpose(0, 2, 1, 3) for j in range(3))
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        attn = _alibi_attention(
            q, k_all, v_all, keep, 1 / math.sqrt(head_dim), slopes, attention_mask
        )
        merged = attn.transpose(0, 2, 1, 3).reshape(b, s, hidden_size)
        out = merged @ w[p + "self_attention.dense.weight"].T + w[p + "self_attention.dense.bias"]
        hidden = hidden + out
        x = ref.layer_norm(
            hidden,
            w[p + "post_attention_layernorm.weight"],
            w[p + "post_attention_layernorm.bias"],
            eps,
        )
        up = ref.gelu_tanh(
            x @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"]
        )
        hidden = hidden + up @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    hidden = ref.layer_norm(hidden, w[t + "ln_f.weight"], w[t + "ln_f.bias"], eps)
    return hidden @ w[t + "word_embeddings.weight"].T, presents


nf.FAMILIES["bloom"] = {"forward": bloom_forward}
