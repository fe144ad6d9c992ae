"""Bloom (BloomForCausalLM): ALiBi instead of positions, a LayerNorm right after the
embeddings, fused per-head ``query_key_value``, GELU-tanh MLP, tied output projection.

``query_key_value`` ``[heads·3·head_dim, C]`` holds, per head, its q, k and v rows (fix-up
``per_head_rows``). Scores are ``q·k / sqrt(head_dim) + slope_h · key position``.
"""

from collections.abc import Mapping

from graphattn.models.common import (
    alibi_slopes,
    integer,
    linear,
    number,
    optional,
    plain,
    plain_mlp_weights,
    refuse,
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
    compose,
    per_head_rows,
    transpose,
)


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Bloom ``config.json`` (hidden_size / n_embed, n_head, n_layer) to ModelConfig."""
    refuse(config, {"apply_residual_connection_post_layernorm": False})
    hidden = integer(config, "hidden_size", "n_embed")
    heads = integer(config, "n_head", "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} is not a multiple of n_head={heads}")
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    layer = LayerSpec(
        attention=AttentionSpec(heads, heads, hidden // heads, alibi_slopes=alibi_slopes(heads)),
        mlp=MlpSpec("plain", "gelu_tanh", 4 * hidden),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return ModelConfig(
        model_type="bloom",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "max_position_embeddings", "seq_length", default=2048),
        layers=(layer,) * integer(config, "n_layer", "num_hidden_layers"),
        final_norm=norm,
        embedding_norm=norm,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", True)),
        **token_ids(config),
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → BloomForCausalLM tensors."""
    c, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    heads = cfg.num_heads
    t = "transformer"
    plan = {
        "embed_tokens": plain(f"{t}.word_embeddings.weight", (v, c)),
        "embed_norm.weight": plain(f"{t}.word_embeddings_layernorm.weight", (c,)),
        "embed_norm.bias": plain(f"{t}.word_embeddings_layernorm.bias", (c,)),
        "final_norm.weight": plain(f"{t}.ln_f.weight", (c,)),
        "final_norm.bias": plain(f"{t}.ln_f.bias", (c,)),
    }
    plan["lm_head.weight"] = (
        plan["embed_tokens"] if cfg.tie_word_embeddings else plain("lm_head.weight", (v, c))
    )
    for i in range(cfg.num_layers):
        p, role = f"{t}.h.{i}", f"layers.{i}"
        for place, module in (
            ("attn_norm", "input_layernorm"),
            ("mlp_norm", "post_attention_layernorm"),
        ):
            plan[f"{role}.{place}.weight"] = plain(f"{p}.{module}.weight", (c,))
            plan[f"{role}.{place}.bias"] = plain(f"{p}.{module}.bias", (c,))
        fused = f"{p}.self_attention.query_key_value"
        for index, part in enumerate("qkv"):
            take = per_head_rows(index, 3, heads)
            plan[f"{role}.{part}.weight"] = WeightSource(
                f"{fused}.weight.{part}",
                f"{fused}.weight",
                (3 * c, c),
                compose(take, transpose),
                (c, c),
            )
            plan[f"{role}.{part}.bias"] = WeightSource(
                f"{fused}.bias.{part}", f"{fused}.bias", (3 * c,), take, (c,)
            )
        plan[f"{role}.o.weight"] = linear(f"{p}.self_attention.dense.weight", c, c)
        plan[f"{role}.o.bias"] = plain(f"{p}.self_attention.dense.bias", (c,))
        plain_mlp_weights(plan, role, f"{p}.mlp.dense_h_to_4h", f"{p}.mlp.dense_4h_to_h", f, c)
    return plan


ARCHITECTURE = Architecture(
    name="bloom",
    hf_architectures=("BloomForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    genai_type="bloom",
)
