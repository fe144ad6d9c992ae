"""Independent NumPy reference for every graphattn op. Shares no code with ``ops/``.

Written from the math, in float64, with loops where they make the rule obvious:
masks from explicit per-(query, key) rules, attention with K/V repeated per query head and
-inf masking, RoPE as complex multiplication (interleaved) or rotate-half (split halves).
"""

import math

import numpy as np


def keep_mask(attention_mask: np.ndarray, query_len: int, causal: bool, window: int | None):
    """keep [B, 1, S, T] bool: query i (absolute position T - S + i) may see key j."""
    batch, total = attention_mask.shape
    keep = np.zeros((batch, 1, query_len, total), dtype=bool)
    for b in range(batch):
        for i in range(query_len):
            q_pos = total - query_len + i
            for j in range(total):
                ok = attention_mask[b, j] == 1
                if causal and j > q_pos:
                    ok = False
                if window is not None and abs(q_pos - j) >= window:
                    ok = False
                keep[b, 0, i, j] = ok
    return keep


def attention(q, k, v, keep, scale, softcap=None, ssmax_s=None):
    """q [B, H, S, D], k/v [B, Hkv, T, D], keep [B|1, 1, S, T] → out [B, H, S, D] (float64).

    Rows with nothing to attend come out as NaN (the caller compares the others).
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    heads, kv_heads = q.shape[1], k.shape[1]
    k_full = np.repeat(k, heads // kv_heads, axis=1)
    v_full = np.repeat(v, heads // kv_heads, axis=1)
    scores = np.einsum("bhsd,bhtd->bhst", q, k_full) * scale
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    keep_full = np.broadcast_to(keep, scores.shape)
    if ssmax_s is not None:
        attended = np.maximum(keep_full.sum(axis=-1, keepdims=True), 1)
        scores = scores * (ssmax_s * np.log(attended))
    scores = np.where(keep_full, scores, -np.inf)
    with np.errstate(invalid="ignore"):
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhst,bhtd->bhsd", weights, v_full)


def inverse_frequencies(rotary_dim: int, theta: float, scaling: dict | None = None):
    """[rotary_dim / 2] float64, one frequency at a time."""
    result = []
    for i in range(rotary_dim // 2):
        freq = theta ** (-(2.0 * i) / rotary_dim)
        kind = (scaling or {}).get("type")
        if kind == "linear":
            freq /= scaling["factor"]
        elif kind == "llama3":
            wavelength = 2 * math.pi / freq
            old_context = scaling["original_max_position_embeddings"]
            low_wavelength = old_context / scaling["low_freq_factor"]
            high_wavelength = old_context / scaling["high_freq_factor"]
            if wavelength > low_wavelength:
                freq /= scaling["factor"]
            elif wavelength >= high_wavelength:
                smooth = (old_context / wavelength - scaling["low_freq_factor"]) / (
                    scaling["high_freq_factor"] - scaling["low_freq_factor"]
                )
                freq = (1 - smooth) * freq / scaling["factor"] + smooth * freq
        result.append(freq)
    return np.array(result, dtype=np.float64)


def rope(x, position_ids, inv_freq, interleaved: bool):
    """x [B, H, S, D] rotated on its first 2 * len(inv_freq) channels; positions [B, S]."""
    x = np.asarray(x, dtype=np.float64)
    half = len(inv_freq)
    angles = position_ids[:, None, :, None].astype(np.float64) * inv_freq  # [B, 1, S, R]
    rotation = np.exp(1j * angles)
    rotary, passed = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        pairs = rotary[..., 0::2] + 1j * rotary[..., 1::2]
        turned = pairs * rotation
        out = np.empty_like(rotary)
        out[..., 0::2], out[..., 1::2] = turned.real, turned.imag
    else:
        first, second = rotary[..., :half], rotary[..., half:]
        rotate_half = np.concatenate([-second, first], axis=-1)
        cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
        sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
        out = rotary * cos + rotate_half * sin
    return np.concatenate([out, passed], axis=-1)


def rms_norm(x, weight, epsilon):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon) * weight


def layer_norm(x, weight, bias, epsilon):
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(axis=-1, keepdims=True) + epsilon) * weight + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias):
    x = np.asarray(x, dtype=np.float64)
    return gelu_tanh(x @ fc_weight + fc_bias) @ proj_weight + proj_bias


def swiglu_mlp(x, gate_weight, up_weight, down_weight):
    x = np.asarray(x, dtype=np.float64)
    gate = x @ gate_weight
    return (gate / (1 + np.exp(-gate)) * (x @ up_weight)) @ down_weight


def position_ids(attention_mask: np.ndarray, query_len: int):
    """[B, S]: index of each token among its row's real tokens (0 for pads)."""
    out = np.zeros((attention_mask.shape[0], query_len), dtype=np.int64)
    for b, row in enumerate(attention_mask):
        count, positions = 0, []
        for token in row:
            positions.append(max(count, 0) if token else 0)
            count += int(token)
        out[b] = positions[len(row) - query_len :]
    return out
