"""GPT-Neo (GPTNeoForCausalLM).

Learned positions (``wpe``) as GPT-2; per-layer ``global`` or ``local`` attention from
``attention_types`` (``[[["global", "local"], 12]]`` expands to 24 alternating layers), a local
layer seeing the last ``window_size`` positions; no score scaling (HF's GPT-Neo never divides
by ``sqrt(head_dim)``); q/k/v without bias and ``out_proj`` with one; LayerNorms ``ln_1`` /
``ln_2`` (sequential residual); a plain ``c_fc`` / ``c_proj`` MLP with biases (``gelu_new``);
the head tied to ``wte`` by default.
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
    WeightSource,
)

DEFAULT_TYPES = [[["global", "local"], 12]]


def attention_layers(config: Mapping[str, object], count: int) -> list[str]:
    """``attention_types`` expanded as HF does: each ``[kinds, n]`` repeats ``kinds`` n times."""
    types = optional(config, "attention_types", DEFAULT_TYPES)
    layers: list[str] = []
    try:
        for kinds, repeat in types:
            layers.extend(list(kinds) * int(repeat))
    except (TypeError, ValueError):
        raise ValueError(f"config.json attention_types={types!r} is not supported") from None
    unknown = sorted(set(layers) - {"global", "local"})
    if unknown:
        raise ValueError(f"config.json attention_types {unknown} are not supported")
    if len(layers) != count:
        raise ValueError(
            f"config.json attention_types expand to {len(layers)} layers, num_layers={count}"
        )
    return layers


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a GPT-Neo ``config.json`` to ModelConfig."""
    hidden = integer(config, "hidden_size")
    heads = integer(config, "num_heads", "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} is not a multiple of num_heads={heads}")
    count = integer(config, "num_layers", "num_hidden_layers")
    window = integer(config, "window_size", default=256)
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    mlp = MlpSpec(
        "plain",
        activation(config, "activation_function", "gelu_new", ACTIVATIONS),
        integer(config, "intermediate_size", default=4 * hidden),
    )
    layers = tuple(
        LayerSpec(
            attention=AttentionSpec(
                heads,
                heads,
                hidden // heads,
                window=window if kind == "local" else None,
                scale=1.0,
            ),
            mlp=mlp,
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for kind in attention_layers(config, count)
    )
    return ModelConfig(
        model_type="gpt_neo",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "max_position_embeddings", default=2048),
        layers=layers,
        final_norm=norm,
        positions="learned",
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", True)),
        **token_ids(config),
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → GPTNeoForCausalLM tensors (``transformer.h.{i}.attn.attention.*``)."""
    c, v = cfg.hidden_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain("transformer.wte.weight", (v, c)),
        "embed_positions": plain("transformer.wpe.weight", (cfg.context_length, c)),
        "final_norm.weight": plain("transformer.ln_f.weight", (c,)),
        "final_norm.bias": plain("transformer.ln_f.bias", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    for i, layer in enumerate(cfg.layers):
        p, role = f"transformer.h.{i}", f"layers.{i}"
        a, f = f"{p}.attn.attention", layer.mlp.intermediate_size
        for place, module in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for kind in ("weight", "bias"):
                plan[f"{role}.{place}.{kind}"] = plain(f"{p}.{module}.{kind}", (c,))
        for part in "qkv":
            plan[f"{role}.{part}.weight"] = linear(f"{a}.{part}_proj.weight", c, c)
        plan[f"{role}.o.weight"] = linear(f"{a}.out_proj.weight", c, c)
        plan[f"{role}.o.bias"] = plain(f"{a}.out_proj.bias", (c,))
        plain_mlp_weights(plan, role, f"{p}.mlp.c_fc", f"{p}.mlp.c_proj", f, c)
    return plan


ARCHITECTURE = Architecture(
    name="gpt_neo",
    hf_architectures=("GPTNeoForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".attn.attention.bias", ".attn.attention.masked_bias"),
)
