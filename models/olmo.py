"""OLMo (OlmoForCausalLM): the Llama graph with OLMo's non-parametric LayerNorm and clip_qkv.

Every norm (before attention, before the MLP, final) is a LayerNorm with neither weight nor
bias at epsilon 1e-5 (HF hardcodes it): the places exist in each :class:`LayerSpec`, the weight
plan has no norm roles. ``clip_qkv`` clamps q, k and v to ±c after their projections.
Split-halves RoPE over the whole head (every scaling type), GQA, SwiGLU, q/k/v/o biases where
the checkpoint has them (``attention_bias``), ``head_dim`` that may differ from hidden/heads.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import number, refuse, rope_spec
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig, NormSpec

EPSILON = 1e-5  # OlmoLayerNorm's fixed epsilon


def whole_head_rope(config: Mapping[str, object]) -> None:
    """Refuse ``partial_rotary_factor`` ≠ 1: the default RoPE of OLMo, OLMo 2, Cohere,
    Starcoder2 and EXAONE 4 rotates the whole head whatever the key says, while their scaled
    types would honour it; neither reading is safe to guess."""
    params = config.get("rope_parameters")
    scoped = [config]
    if isinstance(params, Mapping):
        scoped.append(params)
    for where in scoped:
        refuse(where, {"partial_rotary_factor": lambda v: v is None or v == 1})


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map an OLMo ``config.json`` to ModelConfig."""
    refuse(config, {"clip_qkv": lambda v: v is None or (not isinstance(v, bool) and v > 0)})
    whole_head_rope(config)
    d = llama.dims(config)
    norm = NormSpec("layer", EPSILON)
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads,
            d.kv_heads,
            d.head_dim,
            rope=rope_spec(config, d.head_dim, partial=1.0),
            clip_qkv=number(config, "clip_qkv", None),
        ),
        mlp=llama.swiglu(config, d),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return llama.model_config(config, "olmo", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict:
    """Llama's names without any norm tensor (OLMo's norms have none)."""
    plan = llama.model_weights(cfg)
    del plan["final_norm.weight"]
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, norms={})
    return plan


ARCHITECTURE = Architecture(
    name="olmo",
    hf_architectures=("OlmoForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
)
