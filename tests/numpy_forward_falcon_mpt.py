"""NumPy forward passes of Falcon (both decoder architectures) and MPT, written from
transformers' modeling_falcon.py / modeling_mpt.py (float64, test side only): registered in
``numpy_forward.FAMILIES``.

Falcon's ALiBi is the one its SDPA path (and the original RW code) computes:
``(q·k + bf16(slope)·position) / sqrt(head_dim)``; ``ALIBI_TIMES`` counts how often the bias is
added (transformers' eager path adds it twice; a test checks both against HF). MPT's bias runs
over raw slot positions, pads included, ending at 0 on the last key, as transformers builds it.
"""

import math

import numpy as np
import numpy_forward as nf
import numpy_reference as ref
from numpy_forward_alibi import bloom_slopes

ALIBI_TIMES = {"falcon": 1}


def round_bfloat16(x):
    """Round to 8 significant bits, ties to even (bfloat16), via frexp."""
    x = np.asarray(x, dtype=np.float64)
    mantissa, exponent = np.frexp(x)  # x = m · 2^e, 0.5 ≤ |m| < 1
    return np.ldexp(np.round(mantissa * 256.0) / 256.0, exponent)


def _erf_gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _attend_with_bias(q, k, v, keep, scale, bias):
    """softmax(scale q kᵀ + bias[b, h, t]) v per (row, head), K/V shared per group."""
    b, h, s, _ = q.shape
    group = h // k.shape[1]
    out = np.zeros((b, h, s, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            kv = hi // group
            scores = scale * q[bi, hi] @ k[bi, kv].T + bias[bi, hi][None, :]
            scores = np.where(keep[bi, 0], scores, -np.inf)
            for row in range(s):
                if np.isfinite(scores[row]).any():
                    e = np.exp(scores[row] - scores[row].max())
                    out[bi, hi, row] = (e / e.sum()) @ v[bi, kv]
    return out


def _linear(x, w, name, bias):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if bias and name + ".bias" in w else y


# --------------------------------------------------------------------------------- Falcon
def falcon_forward(w, config, input_ids, attention_mask, position_ids, past):
    heads = config["num_attention_heads"]
    hidden_size = config["hidden_size"]
    head_dim = hidden_size // heads
    eps = config.get("layer_norm_epsilon", 1e-5)
    new = config.get("new_decoder_architecture", False)
    parallel = config.get("parallel_attn", True)
    two_norms = new and config.get("num_ln_in_parallel_attn", 2) == 2
    if new:
        kv_heads = config.get("num_kv_heads") or heads
    else:
        kv_heads = 1 if config.get("multi_query", True) else heads
    group = heads // kv_heads
    bias = config.get("bias", False)
    act = nf.ACT[config.get("activation", "gelu")]
    alibi = config.get("alibi", False)
    b, s = input_ids.shape
    keep = ref.keep_mask(attention_mask, s, causal=True, window=None)
    if alibi:
        real = (np.cumsum(attention_mask, axis=1) - 1) * attention_mask  # [B, T]
        slopes = round_bfloat16(bloom_slopes(heads))
        times = ALIBI_TIMES["falcon"]
        alibi_bias = times * slopes[None, :, None] * real[:, None, :] / math.sqrt(head_dim)
    else:
        seq_len = int(position_ids.max()) + 1
        inv_freq, factor = nf._rope_for(config, head_dim, None, seq_len)
    t = "transformer."
    hidden = w[t + "word_embeddings.weight"][input_ids]
    presents = []
    for i in range(config["num_hidden_layers"]):
        p = f"{t}h.{i}."

        def ln(module, x, p=p):
            return ref.layer_norm(x, w[p + module + ".weight"], w[p + module + ".bias"], eps)

        x = ln("ln_attn" if two_norms else "input_layernorm", hidden)
        fused = _linear(x, w, p + "self_attention.query_key_value", bias)
        fused = fused.reshape(b, s, kv_heads, group + 2, head_dim)
        q = fused[:, :, :, :group].reshape(b, s, heads, head_dim).transpose(0, 2, 1, 3)
        k = fused[:, :, :, group].transpose(0, 2, 1, 3)
        v = fused[:, :, :, group + 1].transpose(0, 2, 1, 3)
        if not alibi:
            q = nf._rope_apply(q, position_ids, inv_freq, factor, False)
            k = nf._rope_apply(k, position_ids, inv_freq, factor, False)
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        if alibi:
            attn = _attend_with_bias(q, k_all, v_all, keep, 1 / math.sqrt(head_dim), alibi_bias)
        else:
            attn = np.nan_to_num(ref.attention(q, k_all, v_all, keep, 1 / math.sqrt(head_dim)))
        merged = attn.transpose(0, 2, 1, 3).reshape(b, s, hidden_size)
        attended = _linear(merged, w, p + "self_attention.dense", bias)
        if parallel:
            mlp_in = ln("ln_mlp", hidden) if two_norms else x
        else:
            hidden = hidden + attended
            mlp_in = ln("post_attention_layernorm", hidden)
        up = act(_linear(mlp_in, w, p + "mlp.dense_h_to_4h", bias))
        fed = _linear(up, w, p + "mlp.dense_4h_to_h", bias)
        hidden = hidden + fed + attended if parallel else hidden + fed
    hidden = ref.layer_norm(hidden, w[t + "ln_f.weight"], w[t + "ln_f.bias"], eps)
    tied = config.get("tie_word_embeddings", True)
    head = w[t + "word_embeddings.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T, presents


# ------------------------------------------------------------------------------------ MPT
def mpt_slopes(heads, bias_max=8):
    """transformers' build_mpt_alibi_tensor slopes, one at a time."""
    power = 1
    while power < heads:
        power *= 2
    slopes = [1.0 / 2 ** ((i + 1) * bias_max / power) for i in range(power)]
    if power != heads:
        slopes = [slopes[j] for j in range(1, power, 2)] + [slopes[j] for j in range(0, power, 2)]
    return np.array(slopes[:heads])


def mpt_forward(w, config, input_ids, attention_mask, position_ids, past):
    heads = config["n_heads"]
    hidden_size = config["d_model"]
    head_dim = hidden_size // heads
    eps = config.get("layer_norm_epsilon", 1e-5)
    attn_config = config.get("attn_config") or {}
    scale = attn_config.get("softmax_scale") or 1 / math.sqrt(head_dim)
    clip = attn_config.get("clip_qkv")
    b, s = input_ids.shape
    total = attention_mask.shape[1]
    keep = ref.keep_mask(attention_mask, s, causal=True, window=None)
    # raw slot positions (pads included), 0 on the last key: what transformers adds
    raw = np.arange(total) - (total - 1)
    alibi_bias = np.broadcast_to(mpt_slopes(heads)[None, :, None] * raw, (b, heads, total))
    t = "transformer."

    def ln(name, x):
        width = x.shape[-1]
        return ref.layer_norm(x, w[name + ".weight"], w.get(name + ".bias", np.zeros(width)), eps)

    hidden = w[t + "wte.weight"][input_ids]
    presents = []
    for i in range(config["n_layers"]):
        p = f"{t}blocks.{i}."
        x = ln(p + "norm_1", hidden)
        mixed = _linear(x, w, p + "attn.Wqkv", True)
        if clip:
            mixed = np.clip(mixed, -clip, clip)
        q, k, v = (
            part.reshape(b, s, heads, head_dim).transpose(0, 2, 1, 3)
            for part in np.split(mixed, 3, axis=-1)
        )
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        attn = _attend_with_bias(q, k_all, v_all, keep, scale, alibi_bias)
        merged = attn.transpose(0, 2, 1, 3).reshape(b, s, hidden_size)
        hidden = hidden + _linear(merged, w, p + "attn.out_proj", True)
        x = ln(p + "norm_2", hidden)
        up = _erf_gelu(_linear(x, w, p + "ffn.up_proj", True))
        hidden = hidden + _linear(up, w, p + "ffn.down_proj", True)
    hidden = ln(t + "norm_f", hidden)
    tied = config.get("tie_word_embeddings", True)
    head = w[t + "wte.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T, presents


nf.FAMILIES["falcon"] = {"forward": falcon_forward}
nf.FAMILIES["mpt"] = {"forward": mpt_forward}
