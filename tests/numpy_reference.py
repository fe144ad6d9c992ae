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


def rope_frequencies_reference(
    rotary_dim: int,
    theta: float,
    scaling: dict | None,
    max_position_embeddings: int,
    original_max_position_embeddings: int | None = None,
    seq_len: int | None = None,
):
    """(inv_freq [rotary_dim / 2] float64, attention_factor) that transformers' rotary embedding
    uses for a call whose max(position_ids) + 1 is ``seq_len`` (None: as built, before any call).

    Written from the published formulas one frequency at a time: default, linear, dynamic NTK
    (base * (factor * L / L0 - (factor - 1)) ** (d / (d - 2)), L = max(seq_len, L0)), YaRN (linear
    ramp between the correction dimensions of beta_fast and beta_slow), LongRoPE (short factors,
    long ones once seq_len > the original length) and Llama 3.1 (wavelength bands).
    """
    scaling = dict(scaling or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    original = original_max_position_embeddings
    if original is None:
        original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    half = rotary_dim // 2
    base = float(theta)
    if kind == "dynamic":
        length = (
            max_position_embeddings if seq_len is None else max(seq_len, max_position_embeddings)
        )
        factor = scaling["factor"]
        stretch = factor * length / max_position_embeddings - (factor - 1)
        base = base * stretch ** (rotary_dim / (rotary_dim - 2))
    plain = [base ** (-(2.0 * i) / rotary_dim) for i in range(half)]
    attention_factor = 1.0
    if kind in ("default", "dynamic"):
        freqs = plain
    elif kind == "linear":
        freqs = [f / scaling["factor"] for f in plain]
    elif kind == "llama3":
        freqs = []
        for f in plain:
            wavelength = 2 * math.pi / f
            if wavelength < original / scaling["high_freq_factor"]:
                freqs.append(f)
            elif wavelength > original / scaling["low_freq_factor"]:
                freqs.append(f / scaling["factor"])
            else:
                t = (original / wavelength - scaling["low_freq_factor"]) / (
                    scaling["high_freq_factor"] - scaling["low_freq_factor"]
                )
                freqs.append(t * f + (1 - t) * f / scaling["factor"])
    elif kind == "yarn":
        factor = scaling.get("factor")
        if factor is None:
            factor = max_position_embeddings / original

        def mscale_of(scale, m):
            return 1.0 if scale <= 1 else 1.0 + 0.1 * m * math.log(scale)

        if scaling.get("attention_factor") is not None:
            attention_factor = scaling["attention_factor"]
        elif scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale_of(factor, scaling["mscale"]) / mscale_of(
                factor, scaling["mscale_all_dim"]
            )
        else:
            attention_factor = mscale_of(factor, 1.0)

        def correction_dim(rotations):
            # the dimension index d at which original / wavelength(d) == rotations
            return (
                rotary_dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(base))
            )

        lo = correction_dim(scaling.get("beta_fast") or 32)
        hi = correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rotary_dim - 1)
        if hi == lo:
            hi = hi + 0.001
        freqs = []
        for i, f in enumerate(plain):
            interpolate = min(max((i - lo) / (hi - lo), 0.0), 1.0)
            freqs.append(interpolate * (f / factor) + (1 - interpolate) * f)
    elif kind == "longrope":
        factor = scaling.get("factor")
        if factor is None:
            factor = max_position_embeddings / original
        if scaling.get("attention_factor") is not None:
            attention_factor = scaling["attention_factor"]
        elif factor > 1:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
        use_long = seq_len is not None and seq_len > original
        divisors = scaling["long_factor"] if use_long else scaling["short_factor"]
        freqs = [f / divisors[i] for i, f in enumerate(plain)]
    else:
        raise ValueError(f"reference: no rope type {kind!r}")
    return np.array(freqs, dtype=np.float64), float(attention_factor)
