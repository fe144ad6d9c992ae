"""Qwen3 (Qwen3ForCausalLM): the Llama graph plus an RMS QK-norm per head before RoPE.

``q_norm`` / ``k_norm`` weights ``[head_dim]``; q/k/v/o biases where the checkpoint has them
(``attention_bias``); sliding layers from ``layer_types``.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import FULL, layer_types, norm_spec, refuse, rope_spec
from graphattn.spec import Architecture, AttentionSpec, GGUFSpec, LayerSpec, ModelConfig

QK_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm"}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Qwen3 ``config.json`` to ModelConfig."""
    refuse(config, llama.LLAMA_REFUSED)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps")
    layers = [
        LayerSpec(
            attention=AttentionSpec(
                d.heads,
                d.kv_heads,
                d.head_dim,
                rope=rope_spec(config, d.head_dim),
                window=llama.window_of(config, kind),
                qk_norm=norm,
            ),
            mlp=llama.swiglu(config, d),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for kind in layer_types(config, d.layers, FULL)
    ]
    return llama.model_config(config, "qwen3", layers, norm)


def weights(cfg: ModelConfig) -> dict:
    """Llama's names plus ``self_attn.q_norm`` / ``self_attn.k_norm``."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, qk_norms=QK_NORMS)
    return plan


# ------------------------------------------------------------------------------ GGUF
# llama.cpp's Qwen3 converter maps names only (no q/k permutation, norms stored as HF does).
GGUF_LAYER_NAMES = {
    **llama.LLAMA_GGUF_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF Qwen3ForCausalLM ``config.json`` from ``qwen3.*`` GGUF metadata."""
    llama.refuse_gguf_keys(fields, "qwen3")
    config = llama.gguf_common_config(fields, "qwen3", need)
    return {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_act": "silu",
        **config,
    }


GGUF = GGUFSpec(
    arch="qwen3",
    config=gguf_config,
    tensor_names=llama.LLAMA_GGUF_NAMES,
    layer_names=GGUF_LAYER_NAMES,
)

ARCHITECTURE = Architecture(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="qwen3",
    gguf=GGUF,
)
