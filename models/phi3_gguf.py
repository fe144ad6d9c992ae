"""GGUF files of Phi-3 (``phi3``) as llama.cpp's ``convert_hf_to_gguf.py`` writes them.

The fused projections keep HF's layout: ``attn_qkv`` is ``qkv_proj`` (q, k, v rows one after
the other) and ``ffn_up`` is ``gate_up_proj`` (gate rows, then up rows; there is no
``ffn_gate``); rows are not permuted. Metadata: the Llama-shaped keys, the partial rotary
width (``rope.dimension_count``, Phi-4-mini), ``rope.scaling.original_context_length`` and
``attention.sliding_window`` (0: none, as the converter writes for Phi-4).

Refused: LongRoPE files (the 128k models: ``rope_factors_long`` / ``rope_factors_short``
tensors and ``rope.scaling.attn_factor``), which the reader cannot turn into config values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from graphattn.models import llama, phi3
from graphattn.spec import GGUFSpec

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
READ = ("attention.sliding_window",)
REFUSED = tuple(k for k in llama.GGUF_REFUSED if k not in READ)


def gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF Phi3ForCausalLM ``config.json`` from ``phi3.*`` metadata."""
    if "phi3.rope.scaling.attn_factor" in fields:
        raise ValueError(
            "GGUF LongRoPE (phi3.rope.scaling.attn_factor, rope_factors_long/short) is not"
            " supported"
        )
    llama.refuse_gguf_keys(fields, "phi3", REFUSED)
    config = llama.gguf_common_config(fields, "phi3", need)
    window = int(fields.get("phi3.attention.sliding_window", 0))
    original = fields.get("phi3.rope.scaling.original_context_length")
    return {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "hidden_act": "silu",
        **config,
        "original_max_position_embeddings": int(
            config["max_position_embeddings"] if original is None else original
        ),
        "sliding_window": window or None,
    }


GGUF = GGUFSpec(
    arch="phi3",
    config=gguf_config,
    tensor_names=llama.LLAMA_GGUF_NAMES,
    layer_names=LAYER_NAMES,
)

ARCHITECTURE = replace(phi3.ARCHITECTURE, gguf=GGUF)
