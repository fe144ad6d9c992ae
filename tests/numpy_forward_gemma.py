"""NumPy forward passes (test side only) of Gemma, Gemma 2 and Gemma 3, as differences from
numpy_forward's Llama, written from transformers' modeling_gemma*.py.

- Every RMSNorm scales by ``1 + w`` (norm_offset 1.0), the QK-norms of Gemma 3 too.
- Embeddings times ``sqrt(hidden_size)`` rounded to float32 (transformers casts the factor to
  the weights' dtype).
- Gemma 2/3: scores scaled by ``query_pre_attn_scalar ** -0.5``; norms on the attention
  output and around the MLP; sliding layers from the saved ``layer_types``.
- Gemma 2: ``attn_logit_softcapping`` on the scores, ``final_logit_softcapping`` on the
  logits. Gemma 3 applies neither in its attention; Gemma3ForCausalLM caps its logits.
- Gemma 3: one RoPE per layer type (the saved ``rope_parameters[layer_type]``).
- ``gemma3`` (Gemma3ForConditionalGeneration): the same text decoder read from
  ``text_config`` and ``language_model.model.*`` (vision tensors unused).
"""

import math

import numpy as np
import numpy_forward


def _embed_scale(config):
    return float(np.float32(math.sqrt(config["hidden_size"])))


def _query_scale(config, head_dim):
    return config["query_pre_attn_scalar"] ** -0.5


GEMMA = {"norm_offset": 1.0, "embed_scale": _embed_scale, "window_types": ()}
SANDWICH = {
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
GEMMA2 = {
    "norm_offset": 1.0,
    "embed_scale": _embed_scale,
    "act_key": "hidden_activation",
    "norms": SANDWICH,
    "scale": _query_scale,
    "softcap_key": "attn_logit_softcapping",
    "final_softcap_key": "final_logit_softcapping",
}
GEMMA3_TEXT = {
    **GEMMA2,
    "softcap_key": None,
    "qk_norm": ("head", 1.0),
}


def _gemma3_forward(w, config, input_ids, attention_mask, position_ids, past):
    text = dict(config["text_config"])
    text["final_logit_softcapping"] = None  # Gemma3ForConditionalGeneration does not cap
    text["tie_word_embeddings"] = config.get("tie_word_embeddings", True)
    names = {}
    for name, array in w.items():
        if name.startswith("language_model.model."):
            names["model." + name.removeprefix("language_model.model.")] = array
        elif name == "language_model.lm_head.weight":
            names["lm_head.weight"] = array
    return numpy_forward.llama_like_forward(
        names, text, input_ids, attention_mask, position_ids, past, GEMMA3_TEXT
    )


numpy_forward.FAMILIES["gemma"] = GEMMA
numpy_forward.FAMILIES["gemma2"] = GEMMA2
numpy_forward.FAMILIES["gemma3_text"] = GEMMA3_TEXT
numpy_forward.FAMILIES["gemma3"] = {"forward": _gemma3_forward}
