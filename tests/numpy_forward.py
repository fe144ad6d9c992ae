"""Independent NumPy forward passes of GPT-2 and Llama from HF-named weights (float64).

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


def llama_forward(w, config, input_ids, attention_mask, position_ids, past):
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    eps = config.get("rms_norm_eps", 1e-6)
    scaling = config.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling, type=scaling.get("type", scaling.get("rope_type")))
    inv_freq = ref.inverse_frequencies(head_dim, config.get("rope_theta", 10000.0), scaling)
    window = config.get("sliding_window") if config.get("model_type") == "mistral" else None
    keep = _keep(attention_mask, input_ids.shape[1], window)
    hidden = w["model.embed_tokens.weight"][input_ids]
    presents = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        x = ref.rms_norm(hidden, w[p + "input_layernorm.weight"], eps)
        q = _heads(_linear(x, w[a + "q_proj.weight"], w.get(a + "q_proj.bias")), heads)
        k = _heads(_linear(x, w[a + "k_proj.weight"], w.get(a + "k_proj.bias")), kv_heads)
        v = _heads(_linear(x, w[a + "v_proj.weight"], w.get(a + "v_proj.bias")), kv_heads)
        q = ref.rope(q, position_ids, inv_freq, interleaved=False)
        k = ref.rope(k, position_ids, inv_freq, interleaved=False)
        k_all = np.concatenate([past[i][0], k], axis=2)
        v_all = np.concatenate([past[i][1], v], axis=2)
        presents.append((k_all, v_all))
        attn = _merge(_attend(q, k_all, v_all, keep))
        hidden = hidden + _linear(attn, w[a + "o_proj.weight"], w.get(a + "o_proj.bias"))
        x = ref.rms_norm(hidden, w[p + "post_attention_layernorm.weight"], eps)
        m = p + "mlp."
        hidden = hidden + ref.swiglu_mlp(
            x, w[m + "gate_proj.weight"].T, w[m + "up_proj.weight"].T, w[m + "down_proj.weight"].T
        )
    hidden = ref.rms_norm(hidden, w["model.norm.weight"], eps)
    tied = config.get("tie_word_embeddings", False)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return hidden @ head.T, presents


def forward(weights, config, input_ids, attention_mask, position_ids, past=None):
    """Dispatch on ``config["model_type"]``; ``past`` defaults to empty caches."""
    w = {name: np.asarray(array, dtype=np.float64) for name, array in weights.items()}
    if config["model_type"] == "gpt2":
        kv_heads, head_dim, layers = (
            config["n_head"],
            config["n_embd"] // config["n_head"],
            config["n_layer"],
        )
        run = gpt2_forward
    else:
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        layers = config["num_hidden_layers"]
        run = llama_forward
    if past is None:
        empty = np.zeros((input_ids.shape[0], kv_heads, 0, head_dim))
        past = [(empty, empty)] * layers
    return run(w, config, input_ids, attention_mask, position_ids, past)
