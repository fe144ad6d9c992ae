"""Cohere / Command-R (CohereForCausalLM): parallel residual with one shared LayerNorm,
interleaved RoPE, scaled logits.

Each layer is ``h + attn(n(h)) + mlp(n(h))`` with one ``input_layernorm`` (LayerNorm with a
weight and no bias, ``layer_norm_eps``); the final ``model.norm`` is the same kind. RoPE rotates
interleaved pairs ``(2i, 2i+1)`` (HF's ``rotate_half`` here is the interleaved one) with base
500000 unless the config says otherwise. Logits are multiplied by ``logit_scale``. GQA, SwiGLU,
q/k/v/o biases (``attention_bias``), tied embeddings by default.

Refused: ``use_qk_norm`` (Command-R+): its LayerNorms have one weight per head
(``[heads, head_dim]``), which the core's QK-norm (one weight shared by every head) cannot hold.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import number, rope_spec
from graphattn.models.olmo import whole_head_rope
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig, NormSpec

DEFAULT_THETA = 500000.0  # CohereConfig.default_theta


def _with_theta(config: Mapping[str, object]) -> Mapping[str, object]:
    """``config`` with Cohere's default RoPE base where it states none."""
    params = config.get("rope_parameters")
    if config.get("rope_theta") is not None or (
        isinstance(params, Mapping) and params.get("rope_theta") is not None
    ):
        return config
    return {**config, "rope_theta": DEFAULT_THETA}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Cohere ``config.json`` to ModelConfig."""
    if config.get("use_qk_norm"):
        raise ValueError(
            "config.json use_qk_norm=true is not supported (per-head LayerNorm weights "
            "[heads, head_dim]; the QK-norm shares one weight across heads)"
        )
    whole_head_rope(config)
    d = llama.dims(config)
    norm = NormSpec("layer", number(config, "layer_norm_eps", 1e-5))
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads,
            d.kv_heads,
            d.head_dim,
            rope=rope_spec(_with_theta(config), d.head_dim, interleaved=True, partial=1.0),
        ),
        mlp=llama.swiglu(config, d),
        norms={"attn_norm": norm},
        residual="parallel",
    )
    return llama.model_config(
        config,
        "cohere",
        [layer] * d.layers,
        norm,
        logit_scale=number(config, "logit_scale", 0.0625),
        tied=True,
    )


def weights(cfg: ModelConfig) -> dict:
    """Llama's names with only ``input_layernorm`` per layer (a weight, no bias)."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, norms={"attn_norm": "input_layernorm"})
    return plan


ARCHITECTURE = Architecture(
    name="cohere",
    hf_architectures=("CohereForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
)
