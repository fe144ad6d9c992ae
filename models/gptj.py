"""GPT-J (GPTJForCausalLM).

One LayerNorm ``ln_1`` per layer feeding both branches of a parallel residual
(``h + attn(ln_1(h)) + mlp(ln_1(h))``); q/k/v/out projections without bias; interleaved RoPE
(channels ``2i`` and ``2i + 1`` rotate together, HF's ``rotate_every_two``) on the first
``rotary_dim`` channels of each head, base 10000; a plain ``fc_in`` / ``fc_out`` MLP with
biases (``gelu_new``); an ``lm_head`` with bias.

The pieces (:func:`parallel_layers`, :func:`model_config`, :func:`model_weights`) are what
CodeGen, GPT-J with a fused projection, composes.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    integer,
    linear,
    number,
    optional,
    plain,
    plain_mlp_weights,
    tied_head,
    token_ids,
)
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    NormSpec,
    RopeSpec,
    WeightSource,
)

# The sinusoid table HF builds for GPT-J and CodeGen has a fixed base.
THETA = 10000.0


def parallel_layers(config: Mapping[str, object]) -> tuple[LayerSpec, ...]:
    """GPT-J's layers from ``n_embd``, ``n_head``, ``n_layer``, ``rotary_dim``, ``n_inner``,
    ``activation_function``, ``layer_norm_epsilon``."""
    hidden = integer(config, "n_embd", "hidden_size")
    heads = integer(config, "n_head", "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config n_embd={hidden} is not a multiple of n_head={heads}")
    head_dim = hidden // heads
    if config.get("rotary_dim") is None:
        # HF then builds a hidden_size-wide table that only fits a single head
        raise ValueError("config.json rotary_dim=None is not supported")
    rotary = integer(config, "rotary_dim")
    if rotary % 2 or not 2 <= rotary <= head_dim:
        raise ValueError(
            f"config.json rotary_dim={rotary} is not supported (an even width up to {head_dim})"
        )
    context = integer(config, "n_positions", "max_position_embeddings")
    rope = RopeSpec(rotary_dim=rotary, theta=THETA, interleaved=True, context=context)
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    mlp = MlpSpec(
        "plain",
        activation(config, "activation_function", "gelu_new", ACTIVATIONS),
        integer(config, "n_inner", default=4 * hidden),
    )
    layer = LayerSpec(
        attention=AttentionSpec(heads, heads, head_dim, rope=rope),
        mlp=mlp,
        norms={"attn_norm": norm},
        residual="parallel",
    )
    return (layer,) * integer(config, "n_layer", "num_hidden_layers")


def model_config(config: Mapping[str, object], model_type: str) -> ModelConfig:
    """GPT-J's model-wide facts (untied head by default, final ``ln_f``)."""
    layers = parallel_layers(config)
    return ModelConfig(
        model_type=model_type,
        vocab_size=integer(config, "vocab_size"),
        hidden_size=integer(config, "n_embd", "hidden_size"),
        context_length=integer(config, "n_positions", "max_position_embeddings"),
        layers=layers,
        final_norm=layers[0].norms["attn_norm"],
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", False)),
        **token_ids(config),
    )


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a GPT-J ``config.json`` to ModelConfig."""
    return model_config(config, "gptj")


def model_weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Embeddings, ``ln_f``, ``lm_head`` (weight and bias) and each layer's ``ln_1`` and MLP,
    with GPT-J's names; attention projections are the caller's."""
    c, v = cfg.hidden_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain("transformer.wte.weight", (v, c)),
        "final_norm.weight": plain("transformer.ln_f.weight", (c,)),
        "final_norm.bias": plain("transformer.ln_f.bias", (c,)),
        "lm_head.bias": plain("lm_head.bias", (v,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    for i, layer in enumerate(cfg.layers):
        p, role = f"transformer.h.{i}", f"layers.{i}"
        f = layer.mlp.intermediate_size
        plan[f"{role}.attn_norm.weight"] = plain(f"{p}.ln_1.weight", (c,))
        plan[f"{role}.attn_norm.bias"] = plain(f"{p}.ln_1.bias", (c,))
        plan[f"{role}.o.weight"] = linear(f"{p}.attn.out_proj.weight", c, c)
        plain_mlp_weights(plan, role, f"{p}.mlp.fc_in", f"{p}.mlp.fc_out", f, c)
    return plan


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → GPTJForCausalLM tensors (``transformer.h.{i}.attn.q_proj.weight`` ...)."""
    plan = model_weights(cfg)
    c = cfg.hidden_size
    for i in range(cfg.num_layers):
        for part in "qkv":
            plan[f"layers.{i}.{part}.weight"] = linear(
                f"transformer.h.{i}.attn.{part}_proj.weight", c, c
            )
    return plan


ARCHITECTURE = Architecture(
    name="gptj",
    hf_architectures=("GPTJForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".attn.bias", ".attn.masked_bias", ".attn.rotary_emb.embed_positions"),
)
