"""Independent float64 NumPy forwards of GPT-NeoX, GPT-J, CodeGen, GPT-Neo and GPT-BigCode,
written from transformers' modeling files (HF weight names, torch layouts); shares nothing with
``models/`` or the builder. Each registers ``{"forward": fn}`` in ``numpy_forward.FAMILIES``:
``fn(w, config, input_ids, attention_mask, position_ids, past) -> (logits, presents)``.

``with_common_names(config)`` adds the generic key names (``num_attention_heads``,
``hidden_size``, ``num_hidden_layers``) that ``numpy_forward.forward`` reads to size the empty
caches, for the families whose ``config.json`` spells them ``n_head`` / ``num_heads`` ...
"""

import math

import numpy as np
import numpy_forward
import numpy_reference as ref


def _linear(x, weight, bias=None):  # torch layout [out, in]
    y = x @ weight.T
    return y if bias is None else y + bias


def _heads(x, count):  # [B, S, count*D] -> [B, count, S, D]
    b, s, _ = x.shape
    return x.reshape(b, s, count, -1).transpose(0, 2, 1, 3)


def _merge(x):
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _cached(past, i, k, v):
    return np.concatenate([past[i][0], k], axis=2), np.concatenate([past[i][1], v], axis=2)


def _attend(q, k_all, v_all, attention_mask, scale, window=None):
    keep = ref.keep_mask(attention_mask, q.shape[2], causal=True, window=window)
    return np.nan_to_num(ref.attention(q, k_all, v_all, keep, scale))


def _empty(past, batch, kv_heads, head_dim, layers):
    if past is not None:
        return past
    empty = np.zeros((batch, kv_heads, 0, head_dim))
    return [(empty, empty)] * layers


def _gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


ACT = {
    "gelu": _gelu_erf,
    "gelu_new": ref.gelu_tanh,
    "gelu_pytorch_tanh": ref.gelu_tanh,
    "gelu_fast": ref.gelu_tanh,
    "relu": lambda x: np.maximum(x, 0),
}


def _key(config, *names, default=None):
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


# ------------------------------------------------------------------------------ GPT-NeoX
def _neox_rope(config, head_dim, seq_len):
    """HF's GPTNeoXConfig: ``rope_scaling`` (old files) or ``rope_parameters``; base from
    ``rotary_emb_base``, fraction from ``rotary_pct`` (0.25) when the dict lacks them."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    theta = params.pop("rope_theta", config.get("rotary_emb_base", 10000.0))
    partial = params.pop("partial_rotary_factor", config.get("rotary_pct", 0.25))
    dim = int(head_dim * partial)
    inv_freq, factor = ref.rope_frequencies_reference(
        dim, theta, params, config.get("max_position_embeddings", 2048), None, seq_len
    )
    return np.asarray(inv_freq), factor


def gpt_neox_forward(w, config, input_ids, attention_mask, position_ids, past):
    hidden_size, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim, layers = hidden_size // heads, config["num_hidden_layers"]
    eps = config.get("layer_norm_eps", 1e-5)
    act = ACT[config.get("hidden_act", "gelu")]
    parallel = config.get("use_parallel_residual", True)
    past = _empty(past, input_ids.shape[0], heads, head_dim, layers)
    inv_freq, factor = _neox_rope(config, head_dim, int(position_ids.max()) + 1)
    rotary = 2 * len(inv_freq)

    def rotate(x):
        turned = ref.rope(x[..., :rotary], position_ids, inv_freq, interleaved=False) * factor
        return np.concatenate([turned, x[..., rotary:]], axis=-1)

    hidden = w["gpt_neox.embed_in.weight"][input_ids]
    presents = []
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        x = ref.layer_norm(
            hidden, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps
        )
        a = p + "attention."
        qkv = _linear(x, w[a + "query_key_value.weight"], w.get(a + "query_key_value.bias"))
        b, s, _ = qkv.shape
        # rows grouped per head: [.., heads, (q | k | v) of head_dim]
        grouped = qkv.reshape(b, s, heads, 3 * head_dim).transpose(0, 2, 1, 3)
        q, k, v = np.split(grouped, 3, axis=-1)
        q, k = rotate(q), rotate(k)
        k_all, v_all = _cached(past, i, k, v)
        presents.append((k_all, v_all))
        attn = _attend(q, k_all, v_all, attention_mask, 1 / math.sqrt(head_dim))
        out = _linear(_merge(attn), w[a + "dense.weight"], w.get(a + "dense.bias"))

        def mlp(y, p=p):
            m = p + "mlp."
            fc = _linear(y, w[m + "dense_h_to_4h.weight"], w[m + "dense_h_to_4h.bias"])
            return _linear(act(fc), w[m + "dense_4h_to_h.weight"], w[m + "dense_4h_to_h.bias"])

        n2w, n2b = w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"]
        if parallel:
            hidden = hidden + out + mlp(ref.layer_norm(hidden, n2w, n2b, eps))
        else:
            hidden = hidden + out
            hidden = hidden + mlp(ref.layer_norm(hidden, n2w, n2b, eps))
    hidden = ref.layer_norm(
        hidden, w["gpt_neox.final_layer_norm.weight"], w["gpt_neox.final_layer_norm.bias"], eps
    )
    tied = config.get("tie_word_embeddings", False)
    head = w["gpt_neox.embed_in.weight"] if tied else w["embed_out.weight"]
    return hidden @ head.T, presents


# ------------------------------------------------------------------------- GPT-J, CodeGen
def _every_two(x, sin, cos):
    """HF's GPT-J ``apply_rotary_pos_emb``: sin/cos [B, 1, S, R/2] repeated per pair, and
    ``rotate_every_two`` (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    sin = np.repeat(sin, 2, axis=-1)
    cos = np.repeat(cos, 2, axis=-1)
    turned = np.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos + turned * sin


def _sinusoids(position_ids, rotary_dim):
    """GPT-J's sinusoid table rows for position_ids: (sin, cos) [B, 1, S, R/2], base 10000."""
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    angles = position_ids[:, None, :, None].astype(np.float64) * inv_freq
    return np.sin(angles), np.cos(angles)


def _gptj_like_forward(w, config, input_ids, attention_mask, position_ids, past, qkv_of):
    hidden_size, heads, layers = config["n_embd"], config["n_head"], config["n_layer"]
    head_dim = hidden_size // heads
    rotary = config["rotary_dim"]
    eps = config.get("layer_norm_epsilon", 1e-5)
    act = ACT[config.get("activation_function", "gelu_new")]
    past = _empty(past, input_ids.shape[0], heads, head_dim, layers)
    sin, cos = _sinusoids(position_ids, rotary)

    def rotate(x):
        return np.concatenate([_every_two(x[..., :rotary], sin, cos), x[..., rotary:]], axis=-1)

    hidden = w["transformer.wte.weight"][input_ids]
    presents = []
    for i in range(layers):
        p = f"transformer.h.{i}."
        x = ref.layer_norm(hidden, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        q, k, v = (_heads(t, heads) for t in qkv_of(w, p + "attn.", x, hidden_size))
        q, k = rotate(q), rotate(k)
        k_all, v_all = _cached(past, i, k, v)
        presents.append((k_all, v_all))
        attn = _attend(q, k_all, v_all, attention_mask, 1 / math.sqrt(head_dim))
        out = _linear(_merge(attn), w[p + "attn.out_proj.weight"])
        m = p + "mlp."
        fed = _linear(
            act(_linear(x, w[m + "fc_in.weight"], w[m + "fc_in.bias"])),
            w[m + "fc_out.weight"],
            w[m + "fc_out.bias"],
        )
        hidden = hidden + out + fed
    hidden = ref.layer_norm(hidden, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    tied = config.get("tie_word_embeddings", False)
    head = w["transformer.wte.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T + w["lm_head.bias"], presents


def _gptj_qkv(w, a, x, hidden_size):
    return tuple(_linear(x, w[f"{a}{part}_proj.weight"]) for part in "qkv")


def _codegen_qkv(w, a, x, hidden_size):
    """HF's CodeGenAttention: the output viewed as [.., mp_num=4, 3 * C/4], each shard split
    into (query, value, key) of C/4, and the shards' pieces concatenated in order."""
    qkv = _linear(x, w[a + "qkv_proj.weight"])
    b, s, _ = qkv.shape
    local = hidden_size // 4
    shards = qkv.reshape(b, s, 4, 3 * local)
    query, value, key = (shards[..., j * local : (j + 1) * local] for j in range(3))
    return tuple(t.reshape(b, s, hidden_size) for t in (query, key, value))


def gptj_forward(w, config, input_ids, attention_mask, position_ids, past):
    return _gptj_like_forward(w, config, input_ids, attention_mask, position_ids, past, _gptj_qkv)


def codegen_forward(w, config, input_ids, attention_mask, position_ids, past):
    return _gptj_like_forward(
        w, config, input_ids, attention_mask, position_ids, past, _codegen_qkv
    )


# ---------------------------------------------------------------------- GPT-Neo, BigCode
def _learned_forward(w, config, input_ids, attention_mask, position_ids, past, attention):
    """wte + wpe, then per layer ``h + attn(ln_1(h))``, ``h + mlp(ln_2(h))`` with c_fc/c_proj."""
    layers = _key(config, "n_layer", "num_layers", "num_hidden_layers")
    eps = config.get("layer_norm_epsilon", 1e-5)
    act = ACT[config["activation_function"]]
    hidden = w["transformer.wte.weight"][input_ids] + w["transformer.wpe.weight"][position_ids]
    presents = []
    for i in range(layers):
        p = f"transformer.h.{i}."
        x = ref.layer_norm(hidden, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        out, present = attention(i, p, x, past)
        presents.append(present)
        hidden = hidden + out
        x = ref.layer_norm(hidden, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        m = p + "mlp."
        fc = _linear(x, w[m + "c_fc.weight"], w[m + "c_fc.bias"])
        hidden = hidden + _linear(act(fc), w[m + "c_proj.weight"], w[m + "c_proj.bias"])
    hidden = ref.layer_norm(hidden, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    tied = config.get("tie_word_embeddings", True)
    head = w["transformer.wte.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T, presents


def gpt_neo_forward(w, config, input_ids, attention_mask, position_ids, past):
    hidden_size, heads = config["hidden_size"], config["num_heads"]
    head_dim, layers = hidden_size // heads, config["num_layers"]
    kinds = [k for kinds, n in config["attention_types"] for _ in range(n) for k in kinds]
    past = _empty(past, input_ids.shape[0], heads, head_dim, layers)

    def attention(i, p, x, past):
        a = p + "attn.attention."
        q, k, v = (_heads(_linear(x, w[f"{a}{part}_proj.weight"]), heads) for part in "qkv")
        k_all, v_all = _cached(past, i, k, v)
        # local layers: key slot j visible from query slot i when i - j < window_size
        window = config.get("window_size", 256) if kinds[i] == "local" else None
        attn = _attend(q, k_all, v_all, attention_mask, 1.0, window)  # no 1/sqrt(d)
        out = _linear(_merge(attn), w[a + "out_proj.weight"], w[a + "out_proj.bias"])
        return out, (k_all, v_all)

    return _learned_forward(w, config, input_ids, attention_mask, position_ids, past, attention)


def gpt_bigcode_forward(w, config, input_ids, attention_mask, position_ids, past):
    hidden_size, heads = config["n_embd"], config["n_head"]
    head_dim = hidden_size // heads
    multi_query = config.get("multi_query", True)
    kv_heads = 1 if multi_query else heads
    scale = 1 / math.sqrt(head_dim) if config.get("scale_attn_weights", True) else 1.0
    past = _empty(past, input_ids.shape[0], kv_heads, head_dim, config["n_layer"])

    def attention(i, p, x, past):
        a = p + "attn."
        qkv = _linear(x, w[a + "c_attn.weight"], w[a + "c_attn.bias"])
        if multi_query:  # [queries C | one key head | one value head]
            q = _heads(qkv[..., :hidden_size], heads)
            k = qkv[..., hidden_size : hidden_size + head_dim][:, None]
            v = qkv[..., hidden_size + head_dim :][:, None]
        else:  # per head [q | k | v]
            b, s, _ = qkv.shape
            grouped = qkv.reshape(b, s, heads, 3 * head_dim).transpose(0, 2, 1, 3)
            q, k, v = np.split(grouped, 3, axis=-1)
        k_all, v_all = _cached(past, i, k, v)
        attn = _attend(q, k_all, v_all, attention_mask, scale)
        out = _linear(_merge(attn), w[a + "c_proj.weight"], w[a + "c_proj.bias"])
        return out, (k_all, v_all)

    return _learned_forward(w, config, input_ids, attention_mask, position_ids, past, attention)


FORWARDS = {
    "gpt_neox": gpt_neox_forward,
    "gptj": gptj_forward,
    "codegen": codegen_forward,
    "gpt_neo": gpt_neo_forward,
    "gpt_bigcode": gpt_bigcode_forward,
}
for _name, _fn in FORWARDS.items():
    numpy_forward.FAMILIES[_name] = {"forward": _fn}


def with_common_names(config: dict) -> dict:
    """``config`` plus ``num_attention_heads`` / ``hidden_size`` / ``num_hidden_layers`` /
    ``num_key_value_heads`` where it spells them otherwise (``numpy_forward.forward`` reads
    those to size the empty caches; the forwards above read the family's own keys)."""
    out = dict(config)
    heads = _key(config, "num_attention_heads", "n_head", "num_heads")
    out.setdefault("num_attention_heads", heads)
    out.setdefault("hidden_size", _key(config, "hidden_size", "n_embd"))
    out.setdefault("num_hidden_layers", _key(config, "num_hidden_layers", "n_layer", "num_layers"))
    if config.get("model_type") == "gpt_bigcode":
        out["num_key_value_heads"] = 1 if config.get("multi_query", True) else heads
    return out
