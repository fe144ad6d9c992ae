"""Granite (GraniteForCausalLM): the Llama graph with four multipliers.

``embedding_multiplier`` scales the token embeddings, ``attention_multiplier`` IS the score
scale (in place of ``1/sqrt(head_dim)``), ``residual_multiplier`` scales each branch before its
residual add, and the logits are divided by ``logits_scaling``. q/k/v/o biases
(``attention_bias``) and gate/up/down biases (``mlp_bias``) where the checkpoint has them.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import norm_spec, number, rope_spec
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig, WeightSource


def _multiplier(config: Mapping[str, object], key: str) -> float | None:
    """A multiplier (GraniteConfig defaults each to 1.0); None when it is one (no node)."""
    value = number(config, key, 1.0)
    if not value > 0:
        raise ValueError(f"config.json {key}={value!r} is not supported (must be positive)")
    return None if value == 1.0 else value


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Granite ``config.json`` to ModelConfig."""
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps", default=1e-6)
    scale = number(config, "attention_multiplier", 1.0)
    if not scale > 0:
        raise ValueError(f"config.json attention_multiplier={scale!r} is not supported")
    logits_scaling = _multiplier(config, "logits_scaling")
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads, d.kv_heads, d.head_dim, rope=rope_spec(config, d.head_dim), scale=scale
        ),
        mlp=llama.swiglu(config, d),
        norms={"attn_norm": norm, "mlp_norm": norm},
        residual_scale=_multiplier(config, "residual_multiplier"),
    )
    return llama.model_config(
        config,
        "granite",
        [layer] * d.layers,
        norm,
        embedding_scale=_multiplier(config, "embedding_multiplier"),
        logit_scale=None if logits_scaling is None else 1.0 / logits_scaling,
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Llama's names (biases optional)."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i)
    return plan


ARCHITECTURE = Architecture(
    name="granite",
    hf_architectures=("GraniteForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="granite",
)
