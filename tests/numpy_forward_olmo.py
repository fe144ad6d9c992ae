"""NumPy forward descriptions of OLMo, OLMo 2, Cohere, StarCoder2 and EXAONE 4 (test side).

Written from HF's modeling_<family>.py as differences from ``numpy_forward.LLAMA_LIKE``.
OLMo's norms have no weight: its forward hands the Llama-shaped pass unit scales and zero
offsets for them (what ``F.layer_norm(x, shape, None, None, eps=1e-5)`` is).
"""

import numpy as np
import numpy_forward

OLMO_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
OLMO_EPS_KEY = "olmo layer norm epsilon"  # a key no config.json has: OLMo fixes it at 1e-5

OLMO = {"norm": "layer", "norms": OLMO_NORMS, "eps_key": OLMO_EPS_KEY, "clip_key": "clip_qkv"}


def olmo_forward(w, config, input_ids, attention_mask, position_ids, past):
    """OLMo = the Llama-shaped pass with LayerNorms of scale 1 and offset 0 at eps 1e-5."""
    width = config["hidden_size"]
    ones, zeros = np.ones(width), np.zeros(width)
    w = dict(w)
    for i in range(config["num_hidden_layers"]):
        for module in OLMO_NORMS.values():
            w[f"model.layers.{i}.{module}.weight"] = ones
            w[f"model.layers.{i}.{module}.bias"] = zeros
    config = {**config, OLMO_EPS_KEY: 1e-5}
    return numpy_forward.llama_like_forward(
        w, config, input_ids, attention_mask, position_ids, past, OLMO
    )


def _exaone4_rotates(config, index):
    types = config["layer_types"]
    return config.get("sliding_window") is None or types[index] == "sliding_attention"


numpy_forward.FAMILIES["olmo"] = {"forward": olmo_forward}
numpy_forward.FAMILIES["olmo2"] = {
    "qk_norm": ("full", 0.0),
    "norms": {
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    },
}
numpy_forward.FAMILIES["cohere"] = {
    "norm": "layer",
    "eps_key": "layer_norm_eps",
    "norms": {"attn_norm": "input_layernorm"},
    "parallel": True,
    "interleaved": True,
    "logit_scale": lambda config: config["logit_scale"],
}
numpy_forward.FAMILIES["starcoder2"] = {
    "norm": "layer",
    "eps_key": "norm_epsilon",
    "mlp": "plain",
    "mlp_names": ("c_fc", "c_proj"),
    "all_sliding": True,
}
numpy_forward.FAMILIES["exaone4"] = {
    "qk_norm": ("head", 0.0),
    "norms": {
        "post_attn_norm": "post_attention_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    },
    "uses_rope": _exaone4_rotates,
}
