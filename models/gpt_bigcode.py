"""GPT-BigCode (GPTBigCodeForCausalLM): SantaCoder, StarCoder.

GPT-2's layout (learned positions, LayerNorms ``ln_1`` / ``ln_2``, plain ``c_fc`` / ``c_proj``
MLP with biases, ``gelu_pytorch_tanh``, head tied to ``wte``) with torch Linear weights and
multi-query attention: with ``multi_query`` the fused ``c_attn [C + 2·head_dim, C]`` holds all
queries, then one key head, then one value head (row slices of unequal width); without it
``c_attn [3C, C]`` is grouped per head (``[heads, (q, k, v), head_dim]``). ``scale_attn_weights``
false drops the ``1/sqrt(head_dim)`` score scale. ``attention_softmax_in_fp32`` and
``scale_attention_softmax_in_fp32`` only choose the precision of HF's softmax.
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
    refuse,
    sliced_bias,
    sliced_linear,
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
    Transform,
    WeightSource,
    per_head_rows,
    rows,
)


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a GPT-BigCode ``config.json`` to ModelConfig."""
    refuse(config, {"add_cross_attention": False})
    hidden = integer(config, "n_embd", "hidden_size")
    heads = integer(config, "n_head", "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config n_embd={hidden} is not a multiple of n_head={heads}")
    kv_heads = 1 if optional(config, "multi_query", True) else heads
    scale = None if optional(config, "scale_attn_weights", True) else 1.0
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    mlp = MlpSpec(
        "plain",
        activation(config, "activation_function", "gelu_pytorch_tanh", ACTIVATIONS),
        integer(config, "n_inner", default=4 * hidden),
    )
    layer = LayerSpec(
        attention=AttentionSpec(heads, kv_heads, hidden // heads, scale=scale),
        mlp=mlp,
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return ModelConfig(
        model_type="gpt_bigcode",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "n_positions", "max_position_embeddings"),
        layers=(layer,) * integer(config, "n_layer", "num_hidden_layers"),
        final_norm=norm,
        positions="learned",
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", True)),
        **token_ids(config),
    )


def qkv_fixups(cfg: ModelConfig) -> dict[str, tuple[Transform, int]]:
    """Per part: the row fix-up of ``c_attn`` and the part's width."""
    c, d, heads, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.kv_heads
    if kv == heads:  # MHA: rows grouped per head
        return {part: (per_head_rows(i, 3, heads), c) for i, part in enumerate("qkv")}
    kv_width = kv * d
    return {
        "q": (rows(0, c), c),
        "k": (rows(c, c + kv_width), kv_width),
        "v": (rows(c + kv_width, c + 2 * kv_width), kv_width),
    }


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → GPTBigCodeForCausalLM tensors (``transformer.h.{i}.attn.c_attn`` ...)."""
    c, v = cfg.hidden_size, cfg.vocab_size
    total = c + 2 * cfg.kv_heads * cfg.head_dim
    plan = {
        "embed_tokens": plain("transformer.wte.weight", (v, c)),
        "embed_positions": plain("transformer.wpe.weight", (cfg.context_length, c)),
        "final_norm.weight": plain("transformer.ln_f.weight", (c,)),
        "final_norm.bias": plain("transformer.ln_f.bias", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    fixups = qkv_fixups(cfg)
    for i, layer in enumerate(cfg.layers):
        p, role = f"transformer.h.{i}", f"layers.{i}"
        f = layer.mlp.intermediate_size
        for place, module in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            for kind in ("weight", "bias"):
                plan[f"{role}.{place}.{kind}"] = plain(f"{p}.{module}.{kind}", (c,))
        fused = f"{p}.attn.c_attn"
        for part, (take, width) in fixups.items():
            plan[f"{role}.{part}.weight"] = sliced_linear(
                f"{fused}.weight", (0, width), total, c, take, part
            )
            plan[f"{role}.{part}.bias"] = sliced_bias(f"{fused}.bias", total, width, take, part)
        plan[f"{role}.o.weight"] = linear(f"{p}.attn.c_proj.weight", c, c)
        plan[f"{role}.o.bias"] = plain(f"{p}.attn.c_proj.bias", (c,))
        plain_mlp_weights(plan, role, f"{p}.mlp.c_fc", f"{p}.mlp.c_proj", f, c)
    return plan


ARCHITECTURE = Architecture(
    name="gpt_bigcode",
    hf_architectures=("GPTBigCodeForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".attn.masked_bias", "transformer.bias"),
)
