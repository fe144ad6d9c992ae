"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, GELU-tanh MLP, tied lm_head.

HF stores Conv1D weights ``[in, out]`` already, so only the fused ``c_attn [C, 3C]`` needs a
fix-up: it is split into q/k/v column blocks at export time.
"""

from collections.abc import Mapping

from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    integer,
    number,
    optional,
    plain,
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
    column_block,
)


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map GPT-2's ``config.json`` (n_embd, n_layer, n_head, n_positions, ...) to ModelConfig."""
    hidden = integer(config, "n_embd", "hidden_size")
    heads = integer(config, "n_head", "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config n_embd={hidden} is not a multiple of n_head={heads}")
    act = activation(config, "activation_function", "gelu_new", ACTIVATIONS)
    if act != "gelu_tanh":
        raise ValueError(
            f"config activation_function {config['activation_function']!r} is not supported"
        )
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(key):
            raise ValueError(f"config.json {key}=true is not supported")
    scale = None if optional(config, "scale_attn_weights", True) else 1.0
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    layer = LayerSpec(
        attention=AttentionSpec(heads, heads, hidden // heads, scale=scale),
        mlp=MlpSpec("plain", act, integer(config, "n_inner", default=4 * hidden)),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return ModelConfig(
        model_type="gpt2",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "n_positions", "max_position_embeddings"),
        layers=(layer,) * integer(config, "n_layer", "num_hidden_layers"),
        final_norm=norm,
        positions="learned",
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", True)),
        **token_ids(config),
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (names as GPT2LMHeadModel.save_pretrained writes them)."""
    c, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain("transformer.wte.weight", (v, c)),
        "embed_positions": plain("transformer.wpe.weight", (cfg.context_length, c)),
        "final_norm.weight": plain("transformer.ln_f.weight", (c,)),
        "final_norm.bias": plain("transformer.ln_f.bias", (c,)),
    }
    plan["lm_head.weight"] = (
        plan["embed_tokens"] if cfg.tie_word_embeddings else plain("lm_head.weight", (v, c))
    )
    for i in range(cfg.num_layers):
        p = f"transformer.h.{i}"
        for role, name, shape in (
            ("attn_norm.weight", "ln_1.weight", (c,)),
            ("attn_norm.bias", "ln_1.bias", (c,)),
            ("o.weight", "attn.c_proj.weight", (c, c)),
            ("o.bias", "attn.c_proj.bias", (c,)),
            ("mlp_norm.weight", "ln_2.weight", (c,)),
            ("mlp_norm.bias", "ln_2.bias", (c,)),
            ("mlp.fc_weight", "mlp.c_fc.weight", (c, f)),
            ("mlp.fc_bias", "mlp.c_fc.bias", (f,)),
            ("mlp.proj_weight", "mlp.c_proj.weight", (f, c)),
            ("mlp.proj_bias", "mlp.c_proj.bias", (c,)),
        ):
            plan[f"layers.{i}.{role}"] = plain(f"{p}.{name}", shape)
        for index, part in enumerate("qkv"):
            plan[f"layers.{i}.{part}.weight"] = WeightSource(
                f"{p}.attn.c_attn.weight.{part}",
                f"{p}.attn.c_attn.weight",
                (c, 3 * c),
                column_block(index, 3),
                (c, c),
            )
            plan[f"layers.{i}.{part}.bias"] = WeightSource(
                f"{p}.attn.c_attn.bias.{part}",
                f"{p}.attn.c_attn.bias",
                (3 * c,),
                column_block(index, 3),
                (c,),
            )
    return plan


ARCHITECTURE = Architecture(
    name="gpt2",
    hf_architectures=("GPT2LMHeadModel",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".attn.bias", ".attn.masked_bias"),
    genai_type="gpt2",
)
