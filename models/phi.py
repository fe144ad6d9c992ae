"""Phi-1/Phi-2 (PhiForCausalLM): a parallel residual around ONE shared LayerNorm.

``h + dense(attn(ln(h))) + fc2(gelu_new(fc1(ln(h))))`` with ``input_layernorm`` (weight and
bias) the only norm of a layer; q/k/v/dense projections, fc1/fc2 and ``lm_head`` all have
biases; partial RoPE (``partial_rotary_factor``, 0.5 when absent as in PhiConfig);
``final_layernorm`` before the output projection. ``qk_layernorm``: a LayerNorm (weight and
bias ``[hidden_size / num_attention_heads]``, shared by every head) of each query and key head
before RoPE, supported where that width is ``head_dim`` (PhiAttention cannot run otherwise).
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    linear,
    norm_spec,
    optional,
    plain,
    plain_mlp_weights,
    rope_parameters,
    rope_spec,
    tied_head,
)
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    WeightSource,
)

PARTIAL_ROTARY = 0.5  # PhiConfig's default


def partial_rotary(config: Mapping[str, object], default: float) -> float:
    """``partial_rotary_factor`` as transformers reads it: inside ``rope_parameters`` first,
    then at the top level, else the family's default."""
    params = rope_parameters(config)
    value = params.get("partial_rotary_factor", optional(config, "partial_rotary_factor", None))
    return default if value is None else float(value)


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Phi ``config.json`` to ModelConfig."""
    d = llama.dims(config)
    norm = norm_spec(config, "layer", "layer_norm_eps", default=1e-5)
    qk_norm = None
    if optional(config, "qk_layernorm", False):
        if d.head_dim * d.heads != d.hidden:
            raise ValueError(
                f"config.json qk_layernorm=true with head_dim={d.head_dim} is not supported "
                f"(PhiAttention's q/k LayerNorms are hidden_size / num_attention_heads = "
                f"{d.hidden // d.heads} wide)"
            )
        qk_norm = norm
    rope = rope_spec(config, d.head_dim, partial=partial_rotary(config, PARTIAL_ROTARY))
    act = activation(config, "hidden_act", "gelu_new", ACTIVATIONS)
    layer = LayerSpec(
        attention=AttentionSpec(d.heads, d.kv_heads, d.head_dim, rope=rope, qk_norm=qk_norm),
        mlp=MlpSpec("plain", act, d.intermediate),
        norms={"attn_norm": norm},
        residual="parallel",
    )
    return llama.model_config(config, "phi", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → PhiForCausalLM tensors."""
    c, v = cfg.hidden_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain("model.embed_tokens.weight", (v, c)),
        "final_norm.weight": plain("model.final_layernorm.weight", (c,)),
        "final_norm.bias": plain("model.final_layernorm.bias", (c,)),
        "lm_head.bias": plain("lm_head.bias", (v,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    for i, layer in enumerate(cfg.layers):
        a, f = layer.attention, layer.mlp.intermediate_size
        p, role = f"model.layers.{i}", f"layers.{i}"
        q, kv = a.num_heads * a.head_dim, a.kv_heads * a.head_dim
        for kind in ("weight", "bias"):
            plan[f"{role}.attn_norm.{kind}"] = plain(f"{p}.input_layernorm.{kind}", (c,))
            if a.qk_norm is not None:
                for part in "qk":
                    name = f"{p}.self_attn.{part}_layernorm.{kind}"
                    plan[f"{role}.{part}_norm.{kind}"] = plain(name, (a.head_dim,))
        for part, width in (("q", q), ("k", kv), ("v", kv)):
            name = f"{p}.self_attn.{part}_proj"
            plan[f"{role}.{part}.weight"] = linear(f"{name}.weight", width, c)
            plan[f"{role}.{part}.bias"] = plain(f"{name}.bias", (width,))
        plan[f"{role}.o.weight"] = linear(f"{p}.self_attn.dense.weight", c, q)
        plan[f"{role}.o.bias"] = plain(f"{p}.self_attn.dense.bias", (c,))
        plain_mlp_weights(plan, role, f"{p}.mlp.fc1", f"{p}.mlp.fc2", f, c)
    return plan


ARCHITECTURE = Architecture(
    name="phi",
    hf_architectures=("PhiForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="phi",
)
