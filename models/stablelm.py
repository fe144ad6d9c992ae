"""StableLM (StableLmForCausalLM): LayerNorms with bias, partial RoPE, optional parallel residual.

``input_layernorm`` / ``post_attention_layernorm`` / ``model.norm`` are LayerNorms with weight
and bias (``layer_norm_eps``); ``partial_rotary_factor`` (0.25 when absent, as in
StableLmConfig) of each head rotates; q/k/v biases with ``use_qkv_bias``; SwiGLU MLP.
``use_parallel_residual``: ``h + attn(ln(h)) + mlp(ln(h))`` with the one ``input_layernorm``
(the layer then has no ``post_attention_layernorm``). ``head_dim`` is always hidden / heads.

Refused: ``qk_layernorm`` (StableLmLayerNormPerHead keeps a different LayerNorm weight per head,
``[heads, head_dim]``; the attention block's QK-norm shares one ``[head_dim]`` weight).
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import integer, norm_spec, optional, plain, refuse, rope_spec
from graphattn.models.phi import partial_rotary
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig, WeightSource

PARTIAL_ROTARY = 0.25  # StableLmConfig's default
REFUSED = {"qk_layernorm": lambda v: not v}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a StableLM ``config.json`` to ModelConfig."""
    refuse(config, REFUSED)
    hidden, heads = integer(config, "hidden_size"), integer(config, "num_attention_heads")
    if hidden % heads:
        raise ValueError(
            f"config hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
        )
    # StableLmAttention ignores a head_dim key: head_dim is always hidden / heads
    d = llama.dims({**config, "head_dim": hidden // heads})
    norm = norm_spec(config, "layer", "layer_norm_eps", default=1e-5)
    parallel = bool(optional(config, "use_parallel_residual", False))
    rope = rope_spec(config, d.head_dim, partial=partial_rotary(config, PARTIAL_ROTARY))
    layer = LayerSpec(
        attention=AttentionSpec(d.heads, d.kv_heads, d.head_dim, rope=rope),
        mlp=llama.swiglu(config, d),
        norms={"attn_norm": norm} if parallel else {"attn_norm": norm, "mlp_norm": norm},
        residual="parallel" if parallel else "sequential",
    )
    return llama.model_config(config, "stablelm", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Llama's names, plus the LayerNorm biases; q/k/v biases where the checkpoint has them."""
    c = cfg.hidden_size
    plan = llama.model_weights(cfg)
    plan["final_norm.bias"] = plain("model.norm.bias", (c,))
    for i, layer in enumerate(cfg.layers):
        llama.layer_weights(plan, cfg, i, biases=("q", "k", "v"))
        for place, module in llama.LLAMA_NORMS.items():
            if place in layer.norms:
                name = f"model.layers.{i}.{module}.bias"
                plan[f"layers.{i}.{place}.bias"] = plain(name, (c,))
    return plan


ARCHITECTURE = Architecture(
    name="stablelm",
    hf_architectures=("StableLmForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="stablelm",
)
