"""GPT-NeoX (GPTNeoXForCausalLM): Pythia, GPT-NeoX-20B, StableLM-alpha and kin.

LayerNorm with bias; a fused ``query_key_value`` whose rows are grouped per head
(``[heads, 3, head_dim]``: q, k, v of head 0, then of head 1, ...), split into q/k/v at export
time (with its bias); split-halves RoPE on the first ``rotary_pct`` of each head (base
``rotary_emb_base``, HF ``rope_scaling`` linear/dynamic/...); ``use_parallel_residual``
true (``h + attn(ln1(h)) + mlp(ln2(h))``) or false (sequential, GPT-2 style); a plain GELU MLP
``dense_h_to_4h`` / ``dense_4h_to_h`` with biases; ``attention_bias`` false drops the q/k/v and
``dense`` biases; ``embed_in`` / ``embed_out`` (or tied) embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    integer,
    linear,
    norm_spec,
    optional,
    optional_roles,
    plain,
    plain_mlp_weights,
    rope_spec,
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
    WeightSource,
    per_head_rows,
)

PREFIX = "gpt_neox"


def rope_config(config: Mapping[str, object]) -> dict:
    """The config with one ``rope_parameters`` dict as transformers builds it for GPT-NeoX:
    ``rope_scaling`` (older files) replaces ``rope_parameters``; the base defaults to
    ``rotary_emb_base`` and the rotary fraction to ``rotary_pct`` (0.25 when absent)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"config.json rope_parameters={params!r} is not supported")
    params = dict(params)
    params.setdefault("rope_theta", optional(config, "rotary_emb_base", 10000.0))
    params.setdefault("partial_rotary_factor", optional(config, "rotary_pct", 0.25))
    normalized = {k: v for k, v in config.items() if k not in ("rope_scaling", "rope_theta")}
    normalized["rope_parameters"] = params
    return normalized


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a GPT-NeoX ``config.json`` to ModelConfig."""
    hidden = integer(config, "hidden_size")
    heads = integer(config, "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} is not a multiple of heads={heads}")
    head_dim = hidden // heads
    if config.get("head_dim") is not None and integer(config, "head_dim") != head_dim:
        # HF's attention uses hidden/heads while its RoPE would read head_dim
        raise ValueError(f"config.json head_dim={config['head_dim']!r} is not supported")
    rope_cfg = rope_config(config)
    partial = float(rope_cfg["rope_parameters"]["partial_rotary_factor"])
    rotary = int(head_dim * partial)  # HF: int(head_size * rotary_pct), frequencies over it
    if rotary % 2 or rotary < 2:
        raise ValueError(f"config.json rotary_pct={partial!r} gives an odd rotary width {rotary}")
    rope = rope_spec(rope_cfg, head_dim, rotary_dim=rotary)
    norm = norm_spec(config, "layer", "layer_norm_eps", default=1e-5)
    parallel = bool(optional(config, "use_parallel_residual", True))
    mlp = MlpSpec(
        "plain",
        activation(config, "hidden_act", "gelu", ACTIVATIONS),
        integer(config, "intermediate_size"),
    )
    layer = LayerSpec(
        attention=AttentionSpec(heads, heads, head_dim, rope=rope),
        mlp=mlp,
        norms={"attn_norm": norm, "mlp_norm": norm},
        residual="parallel" if parallel else "sequential",
    )
    return ModelConfig(
        model_type="gpt_neox",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "max_position_embeddings", default=2048),
        layers=(layer,) * integer(config, "num_hidden_layers"),
        final_norm=norm,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", False)),
        **token_ids(config),
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → GPTNeoXForCausalLM tensors (``gpt_neox.layers.{i}.attention...``)."""
    c, v, heads = cfg.hidden_size, cfg.vocab_size, cfg.num_heads
    plan = {
        "embed_tokens": plain(f"{PREFIX}.embed_in.weight", (v, c)),
        "final_norm.weight": plain(f"{PREFIX}.final_layer_norm.weight", (c,)),
        "final_norm.bias": plain(f"{PREFIX}.final_layer_norm.bias", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "embed_out.weight", (v, c))
    for i, layer in enumerate(cfg.layers):
        p, role = f"{PREFIX}.layers.{i}", f"layers.{i}"
        f = layer.mlp.intermediate_size
        for place, module in (
            ("attn_norm", "input_layernorm"),
            ("mlp_norm", "post_attention_layernorm"),
        ):
            for kind in ("weight", "bias"):
                plan[f"{role}.{place}.{kind}"] = plain(f"{p}.{module}.{kind}", (c,))
        fused = f"{p}.attention.query_key_value"
        for index, part in enumerate("qkv"):
            take = per_head_rows(index, 3, heads)
            plan[f"{role}.{part}.weight"] = sliced_linear(
                f"{fused}.weight", (0, c), 3 * c, c, take, part
            )
        optional_roles(
            plan,
            [
                (
                    f"{role}.{part}.bias",
                    sliced_bias(f"{fused}.bias", 3 * c, c, per_head_rows(index, 3, heads), part),
                )
                for index, part in enumerate("qkv")
            ]
            + [(f"{role}.o.bias", plain(f"{p}.attention.dense.bias", (c,)))],
        )
        plan[f"{role}.o.weight"] = linear(f"{p}.attention.dense.weight", c, c)
        plain_mlp_weights(plan, role, f"{p}.mlp.dense_h_to_4h", f"{p}.mlp.dense_4h_to_h", f, c)
    return plan


ARCHITECTURE = Architecture(
    name="gpt_neox",
    hf_architectures=("GPTNeoXForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
)
