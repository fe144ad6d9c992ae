"""Independent float64 NumPy forward passes of BERT and ModernBERT from HF-named weights,
written from the papers' definitions (no code shared with ``ops/`` or the builder).

``weights`` maps checkpoint names (``embeddings.word_embeddings.weight``, ...) to arrays in
torch layout (Linear ``[out, in]``). Attention is a loop over rows, heads and queries; a key
is attended when it is a real token (``attention_mask``) and, for a local layer, within the
window; a (pad) query that attends no key is NaN, and stays out of every other position.
Inputs: ``input_ids``, ``attention_mask`` (and ``token_type_ids``) ``[B, S]``.
"""

from __future__ import annotations

import math

import numpy as np


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _attend(q, k, v, mask_row, window):
    """q, k, v [H, S, D] for one row → [H, S, D]; keys kept where mask_row and in window."""
    heads, length, dim = q.shape
    out = np.zeros_like(q)
    for h in range(heads):
        for i in range(length):
            kept = [
                j for j in range(length) if mask_row[j] and (window is None or abs(i - j) <= window)
            ]
            if not kept:  # a pad query with no real key in its window: undefined
                out[h, i] = np.nan
                continue
            scores = np.array([q[h, i] @ k[h, j] / math.sqrt(dim) for j in kept])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            out[h, i] = sum(p * v[h, j] for p, j in zip(probs, kept))
    return out


def _split(x: np.ndarray, heads: int) -> np.ndarray:
    """[S, H·D] → [H, S, D]."""
    length, width = x.shape
    return x.reshape(length, heads, width // heads).transpose(1, 0, 2)


def _merge(x: np.ndarray) -> np.ndarray:
    """[H, S, D] → [S, H·D]."""
    heads, length, dim = x.shape
    return x.transpose(1, 0, 2).reshape(length, heads * dim)


def bert(weights: dict[str, np.ndarray], config: dict, input_ids, attention_mask, token_type_ids):
    """last_hidden_state [B, S, C] float64 of a BertModel."""
    w = {name: np.asarray(a, np.float64) for name, a in weights.items()}
    eps = config.get("layer_norm_eps", 1e-12)
    heads = config["num_attention_heads"]
    batch, length = input_ids.shape
    out = np.zeros((batch, length, config["hidden_size"]))
    for b in range(batch):
        x = (
            w["embeddings.word_embeddings.weight"][input_ids[b]]
            + w["embeddings.position_embeddings.weight"][np.arange(length)]
            + w["embeddings.token_type_embeddings.weight"][token_type_ids[b]]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def lin(name: str, h: np.ndarray, p=p) -> np.ndarray:
                return h @ w[f"{p}{name}.weight"].T + w[f"{p}{name}.bias"]

            q, k, v = (
                _split(lin(f"attention.self.{n}", x), heads) for n in ("query", "key", "value")
            )
            mixed = _merge(_attend(q, k, v, attention_mask[b], None))
            attended = lin("attention.output.dense", mixed)
            x = _layer_norm(
                x + attended,
                w[f"{p}attention.output.LayerNorm.weight"],
                w[f"{p}attention.output.LayerNorm.bias"],
                eps,
            )
            fed = lin("output.dense", _gelu(lin("intermediate.dense", x)))
            x = _layer_norm(
                x + fed, w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"], eps
            )
        out[b] = x
    return out


def _rotate(x: np.ndarray, theta: float) -> np.ndarray:
    """RoPE, split halves: pair (d, d + D/2) of position s turns by s · theta^(-2d/D)."""
    heads, length, dim = x.shape
    half = dim // 2
    y = np.array(x)
    for s in range(length):
        for d in range(half):
            angle = s * theta ** (-2.0 * d / dim)
            c, si = math.cos(angle), math.sin(angle)
            a, b2 = x[:, s, d], x[:, s, d + half]
            y[:, s, d] = a * c - b2 * si
            y[:, s, d + half] = b2 * c + a * si
    return y


def modernbert(weights: dict[str, np.ndarray], config: dict, input_ids, attention_mask):
    """last_hidden_state [B, S, C] float64 of a ModernBertModel (no biases, as the default)."""
    w = {name: np.asarray(a, np.float64) for name, a in weights.items()}
    eps = config.get("norm_eps", 1e-5)
    heads, width = config["num_attention_heads"], config["hidden_size"]
    every = config.get("global_attn_every_n_layers", 3)
    half_window = config["local_attention"] // 2
    ffn = config["intermediate_size"]
    batch, length = input_ids.shape

    def norm(name: str, h: np.ndarray) -> np.ndarray:
        return _layer_norm(h, w[f"{name}.weight"], w.get(f"{name}.bias"), eps)

    out = np.zeros((batch, length, width))
    for b in range(batch):
        x = norm("embeddings.norm", w["embeddings.tok_embeddings.weight"][input_ids[b]])
        for i in range(config["num_hidden_layers"]):
            p = f"layers.{i}."
            is_global = i % every == 0
            theta = config["global_rope_theta"] if is_global else config["local_rope_theta"]
            h = x if i == 0 else norm(f"{p}attn_norm", x)
            qkv = h @ w[f"{p}attn.Wqkv.weight"].T
            q, k, v = (_split(qkv[:, j * width : (j + 1) * width], heads) for j in range(3))
            q, k = _rotate(q, theta), _rotate(k, theta)
            window = None if is_global else half_window
            mixed = _merge(_attend(q, k, v, attention_mask[b], window))
            x = x + mixed @ w[f"{p}attn.Wo.weight"].T
            wide = norm(f"{p}mlp_norm", x) @ w[f"{p}mlp.Wi.weight"].T
            x = x + (_gelu(wide[:, :ffn]) * wide[:, ffn:]) @ w[f"{p}mlp.Wo.weight"].T
        out[b] = norm("final_norm", x)
    return out


def mean_pool_normalize(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """[B, C] float64: per row, the mean over the real tokens, divided by its L2 norm."""
    rows = []
    for b in range(hidden.shape[0]):
        kept = [hidden[b, s] for s in range(hidden.shape[1]) if attention_mask[b, s]]
        mean = np.sum(kept, axis=0) / len(kept)
        rows.append(mean / np.linalg.norm(mean))
    return np.array(rows)
