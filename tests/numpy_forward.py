"""Independent NumPy forward passes of GPT-2 and the Llama-shaped families from HF-named
weights (float64).

Written from the HF modeling code's math; shares nothing with ``ops/``, ``models/`` or the
builder. ``forward`` returns logits [B, S, V] and presents [(key, value) [B, Hkv, T, D]].
"""

import math

import numpy as np
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


def _keep(attention_mask, query_len, window):
    return ref.keep_mask(attention_mask, query_len, causal=True, window=window)


def _attend(q, k_all, v_all, keep):
    out = ref.attention(q, k_all, v_all, keep, 1 / math.sqrt(q.shape[-1]))
    return np.nan_to_num(out)  # fully-masked (pad) rows: undefined, zero them


def gpt2_forward(w, config, input_ids, attention_mask, position_ids, past):
    heads = config["n_head"]
    eps = config.get("layer_norm_epsilon", 1e-5)
    hidden = w["transformer.wte.weight"][input_ids] + w["transformer.wpe.weight"][position_ids]
    keep = _keep(attention_mask, input_ids.shape[1], None)
    presents = []
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}."
        x = ref.layer_norm(hidden, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = x @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]  # Conv1D: [in, out]
        q, k, v = (_heads(part, heads) for part in np.split(qkv, 3, axis=-1))
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        attn = _merge(_attend(q, k_all, v_all, keep))
        hidden = hidden + attn @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        x = ref.layer_norm(hidden, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        hidden = hidden + ref.gelu_mlp(
            x,
            w[p + "mlp.c_fc.weight"],
            w[p + "mlp.c_fc.bias"],
            w[p + "mlp.c_proj.weight"],
            w[p + "mlp.c_proj.bias"],
        )
    hidden = ref.layer_norm(hidden, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    head = w.get("lm_head.weight", w["transformer.wte.weight"])
    if config.get("tie_word_embeddings", True):
        head = w["transformer.wte.weight"]
    return hidden @ head.T, presents


# ----------------------------------------------------------------- Llama-shaped families
# A family here is a small dict of what differs from Llama, written from HF's modeling code
# (test side only): names, norm kind and offset, QK-norm, extra norms, scales, MLP, residual.


def _rope_for(config, head_dim, layer_type, seq_len):
    params = config.get("rope_parameters") or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    scaling = dict(config.get("rope_scaling") or {})
    scaling.update(params)
    theta = scaling.pop("rope_theta", config.get("rope_theta", 10000.0))
    partial = scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial) // 2 * 2
    inv_freq, factor = ref.rope_frequencies_reference(
        rotary_dim,
        theta,
        scaling,
        config.get("max_position_embeddings", 2048),
        config.get("original_max_position_embeddings"),
        seq_len,
    )
    return np.asarray(inv_freq), factor


def _rope_apply(x, position_ids, inv_freq, factor, interleaved):
    """RoPE on the first 2R channels; the attention factor scales cos and sin, so the rotated
    channels by that factor."""
    rotary = 2 * len(inv_freq)
    rotated = ref.rope(x[..., :rotary], position_ids, inv_freq, interleaved=interleaved) * factor
    return np.concatenate([rotated, x[..., rotary:]], axis=-1)


def _norm(kind, x, weight, bias, eps, offset):
    if weight is not None and offset:
        weight = weight + offset
    if kind == "rms":
        return ref.rms_norm(x, weight if weight is not None else 1.0, eps)
    width = x.shape[-1]
    return ref.layer_norm(
        x,
        weight if weight is not None else np.ones(width),
        bias if bias is not None else np.zeros(width),
        eps,
    )


ACT = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu_pytorch_tanh": ref.gelu_tanh,
    "gelu_new": ref.gelu_tanh,
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "relu": lambda x: np.maximum(x, 0),
    "relu2": lambda x: np.maximum(x, 0) ** 2,
}

LLAMA_LIKE = {
    "norm": "rms",  # or "layer"
    "norm_offset": 0.0,  # 1.0 for Gemma's (1 + w) norms
    "eps_key": "rms_norm_eps",
    "prefix": "model.layers.",
    "attention": "self_attn.",
    "norms": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "final_norm": "model.norm",
    "embed": "model.embed_tokens.weight",
    "qkv": None,  # callable(w, attention_prefix, x) -> q, k, v [B, S, *] (fused projections)
    "qk_norm": None,  # ("head" | "full", offset)
    "act_key": "hidden_act",
    "mlp": "gated",  # gate_proj/up_proj/down_proj; "plain": fc_name/proj_name
    "mlp_names": ("gate_proj", "up_proj", "down_proj"),
    "embed_scale": None,  # callable(config) -> float
    "scale": None,  # callable(config, head_dim) -> score scale (default 1/sqrt(head_dim))
    "softcap_key": None,  # config key of the attention-logit softcap
    "final_softcap_key": None,  # config key of the final-logit softcap
    "logit_scale": None,  # callable(config) -> float multiplying the logits
    "residual_scale": None,  # callable(config) -> float multiplying each branch
    "parallel": False,  # h + attn(n1(h)) + mlp(n2(h) or n1(h))
    "clip_key": None,  # config key of a q/k/v clamp (OLMo's clip_qkv)
    "uses_rope": None,  # callable(config, layer_index) -> bool (NoPE layers)
    "interleaved": False,
    "window_types": ("sliding_attention",),
    "all_sliding": False,
}

FAMILIES = {
    "llama": {},
    "mistral": {"all_sliding": True},
    "qwen2": {},
    "qwen3": {"qk_norm": ("head", 0.0)},
}


def _plugins() -> None:
    """Families described in ``tests/numpy_forward_*.py`` register themselves in FAMILIES
    (a dict of differences, or ``{"forward": fn}`` for a family of another shape)."""
    import importlib
    from pathlib import Path

    for path in sorted(Path(__file__).parent.glob("numpy_forward_*.py")):
        importlib.import_module(path.stem)


def llama_like_forward(w, config, input_ids, attention_mask, position_ids, past, family):
    """A Llama-shaped decoder with the differences in ``family`` (see LLAMA_LIKE)."""
    f = {**LLAMA_LIKE, **family}
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps = config.get(f["eps_key"], 1e-6)
    layers = config["num_hidden_layers"]
    types = config.get("layer_types") or ["full_attention"] * layers
    seq_len = int(position_ids.max()) + 1
    scale = f["scale"](config, head_dim) if f["scale"] else 1 / math.sqrt(head_dim)
    softcap = config.get(f["softcap_key"]) if f["softcap_key"] else None
    residual = f["residual_scale"](config) if f["residual_scale"] else 1.0
    clip = config.get(f["clip_key"]) if f["clip_key"] else None
    hidden = w[f["embed"]][input_ids]
    if f["embed_scale"] is not None:
        hidden = hidden * f["embed_scale"](config)
    presents = []
    for i in range(layers):
        p = f"{f['prefix']}{i}."
        a = p + f["attention"]
        sliding = (f["all_sliding"] and config.get("sliding_window")) or (
            types[i] in f["window_types"]
        )
        window = config.get("sliding_window") if sliding else None

        def norm(place, x, p=p):
            name = f["norms"].get(place)
            if name is None or p + name + ".weight" not in w:
                return x
            weight, bias = w[p + name + ".weight"], w.get(p + name + ".bias")
            return _norm(f["norm"], x, weight, bias, eps, f["norm_offset"])

        x = norm("attn_norm", hidden)
        if f["qkv"] is not None:
            q, k, v = f["qkv"](w, a, x)
        else:
            q, k, v = (
                _linear(x, w[f"{a}{part}_proj.weight"], w.get(f"{a}{part}_proj.bias"))
                for part in "qkv"
            )
        if clip is not None:
            q, k, v = (np.clip(t, -clip, clip) for t in (q, k, v))
        if f["qk_norm"] is not None and f["qk_norm"][0] == "full":
            q = _norm("rms", q, w[a + "q_norm.weight"], None, eps, f["qk_norm"][1])
            k = _norm("rms", k, w[a + "k_norm.weight"], None, eps, f["qk_norm"][1])
        q, k, v = _heads(q, heads), _heads(k, kv_heads), _heads(v, kv_heads)
        if f["qk_norm"] is not None and f["qk_norm"][0] == "head":
            q = _norm("rms", q, w[a + "q_norm.weight"], None, eps, f["qk_norm"][1])
            k = _norm("rms", k, w[a + "k_norm.weight"], None, eps, f["qk_norm"][1])
        if f["uses_rope"] is None or f["uses_rope"](config, i):
            inv_freq, factor = _rope_for(config, head_dim, types[i], seq_len)
            q = _rope_apply(q, position_ids, inv_freq, factor, f["interleaved"])
            k = _rope_apply(k, position_ids, inv_freq, factor, f["interleaved"])
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        keep = _keep(attention_mask, input_ids.shape[1], window)
        attn = np.nan_to_num(ref.attention(q, k_all, v_all, keep, scale, softcap))
        out = _linear(_merge(attn), w[a + "o_proj.weight"], w.get(a + "o_proj.bias"))
        attended = norm("post_attn_norm", out)
        mlp_in = norm("mlp_norm", hidden) if not f["parallel"] else None
        if f["parallel"]:
            has_mlp_norm = (
                f["norms"].get("mlp_norm") and p + f["norms"]["mlp_norm"] + ".weight" in w
            )
            mlp_in = norm("mlp_norm", hidden) if has_mlp_norm else x
        else:
            hidden = hidden + residual * attended
            mlp_in = norm("mlp_norm", hidden)
        m = p + "mlp."
        act = ACT[config.get(f["act_key"], "silu")]
        if f["mlp"] == "gated":
            g_name, u_name, d_name = f["mlp_names"]
            gate = _linear(mlp_in, w[m + g_name + ".weight"], w.get(m + g_name + ".bias"))
            up = _linear(mlp_in, w[m + u_name + ".weight"], w.get(m + u_name + ".bias"))
            fed = _linear(act(gate) * up, w[m + d_name + ".weight"], w.get(m + d_name + ".bias"))
        else:
            fc_name, proj_name = f["mlp_names"]
            fc = _linear(mlp_in, w[m + fc_name + ".weight"], w.get(m + fc_name + ".bias"))
            fed = _linear(act(fc), w[m + proj_name + ".weight"], w.get(m + proj_name + ".bias"))
        fed = norm("post_mlp_norm", fed)
        if f["parallel"]:
            hidden = hidden + residual * (attended + fed)
        else:
            hidden = hidden + residual * fed
    final = f["final_norm"]
    hidden = _norm(
        f["norm"], hidden, w.get(final + ".weight"), w.get(final + ".bias"), eps, f["norm_offset"]
    )
    tied = config.get("tie_word_embeddings", False)
    head = w[f["embed"]] if tied or "lm_head.weight" not in w else w["lm_head.weight"]
    logits = hidden @ head.T
    if "lm_head.bias" in w:
        logits = logits + w["lm_head.bias"]
    if f["logit_scale"] is not None:
        logits = logits * f["logit_scale"](config)
    cap = config.get(f["final_softcap_key"]) if f["final_softcap_key"] else None
    if cap:
        logits = cap * np.tanh(logits / cap)
    return logits, presents


class _NoPast:
    """An empty cache entry for a family whose cache shape this module does not compute:
    ``np.concatenate([empty, k], axis=2)`` is ``k`` (through NumPy's ``__array_function__``)."""

    def __array_function__(self, func, types, args, kwargs):
        if func is not np.concatenate:
            return NotImplemented
        arrays = [a for a in args[0] if not isinstance(a, _NoPast)]
        return np.concatenate(arrays, *args[1:], **kwargs)


def knows(config) -> bool:
    """Whether this module has a forward pass for the config's family."""
    _plugins()
    return config.get("model_type") == "gpt2" or config.get("model_type") in FAMILIES


def forward(weights, config, input_ids, attention_mask, position_ids, past=None):
    """Dispatch on ``config["model_type"]``; ``past`` defaults to empty caches."""
    w = {name: np.asarray(array, dtype=np.float64) for name, array in weights.items()}
    _plugins()
    if config["model_type"] == "gpt2":
        kv_heads, head_dim, layers = (
            config["n_head"],
            config["n_embd"] // config["n_head"],
            config["n_layer"],
        )
        run = gpt2_forward
    elif "forward" in FAMILIES.get(config["model_type"], {}):
        if past is None:
            past = [(_NoPast(), _NoPast())] * 1024
        return FAMILIES[config["model_type"]]["forward"](
            w, config, input_ids, attention_mask, position_ids, past
        )
    else:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        layers = config["num_hidden_layers"]
        _plugins()
        family = FAMILIES[config["model_type"]]

        def run(*args):
            if "forward" in family:
                return family["forward"](*args)
            return llama_like_forward(*args, family)

    if past is None:
        empty = np.zeros((input_ids.shape[0], kv_heads, 0, head_dim))
        past = [(empty, empty)] * layers
    return run(w, config, input_ids, attention_mask, position_ids, past)
