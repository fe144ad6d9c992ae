"""MPT (MptForCausalLM): ALiBi with MPT's own slopes, fused ``Wqkv`` (rows q | k | v),
``clip_qkv``, ``softmax_scale``, LayerNorm without bias, exact-GELU MLP ``up_proj`` /
``down_proj`` (4·d_model), tied head by default.

transformers builds MPT's bias over raw slot positions (pads included, ending at 0 on the last
key); ours counts real tokens only. Per query row the two differ by a constant, which the
softmax ignores. MPT's slopes formula (at ``alibi_bias_max=8``) gives Bloom's slopes for every
head count; it is written out here as MPT states it. transformers' MptForCausalLM has no
biases whatever ``no_bias`` says; with ``no_bias=false`` the LayerNorm and projection biases
of an original (llm-foundry) checkpoint are read where the checkpoint has them.
``learned_pos_emb`` is not read: transformers ignores it and with ALiBi MPT has no position
table.

Refused (transformers computes none of them, or computes something else than the config
says): ``attn_config`` with ``alibi=false`` (learned positions), ``alibi_bias_max`` other
than 8 (transformers always uses 8), ``qk_ln`` / ``qk_gn``, ``prefix_lm``,
``attn_uses_sequence_id``, ``attn_type`` other than multi-head, ``rope``, a sliding window,
``kv_n_heads`` ≠ ``n_heads``; ``expansion_ratio`` other than 4 (transformers' MLP is 4·d_model),
``logit_scale``, ``norm_type`` other than LayerNorm, an ``ffn_config`` other than MPT's MLP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from graphattn.models.common import (
    integer,
    linear,
    number,
    optional,
    optional_roles,
    plain,
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
    WeightSource,
    rows,
)

ALIBI_BIAS_MAX = 8  # transformers' build_mpt_alibi_tensor is always called with its default


def mpt_alibi_slopes(heads: int, bias_max: float = ALIBI_BIAS_MAX) -> tuple[float, ...]:
    """MPT's slopes: ``2^-(i·bias_max/P)`` for i = 1..P with P the power of two ≥ heads;
    for other head counts the odd-indexed slopes first, then the even ones, cut to heads."""
    power = 2 ** math.ceil(math.log2(heads))
    slopes = [2.0 ** -(i * bias_max / power) for i in range(1, power + 1)]
    if power != heads:
        slopes = (slopes[1::2] + slopes[::2])[:heads]
    return tuple(slopes)


# attn_config keys transformers does not compute (or computes otherwise): their only value.
ATTN_REFUSED = {
    "attn_type": "multihead_attention",
    "alibi": True,  # alibi=false means learned positions, which transformers' MPT lacks
    "alibi_bias_max": lambda v: v in (None, ALIBI_BIAS_MAX),
    "qk_ln": False,
    "qk_gn": False,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
    "rope": False,
    "sliding_window_size": lambda v: v is None or v == -1,
}


def _attention_config(config: Mapping[str, object]) -> Mapping[str, object]:
    """``attn_config``, refusing (by ``attn_config.<key>``) what is not implemented."""
    attn = config.get("attn_config") or {}
    if not isinstance(attn, Mapping):
        raise ValueError(f"config.json attn_config must be a mapping, got {attn!r}")
    heads = config.get("n_heads", config.get("num_attention_heads"))
    try:
        refuse(attn, {**ATTN_REFUSED, "kv_n_heads": lambda v: v is None or v == heads})
    except ValueError as error:
        raise ValueError(
            str(error).replace("config.json ", "config.json attn_config.", 1)
        ) from None
    return attn


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map an MPT ``config.json`` (d_model, n_heads, n_layers, max_seq_len, attn_config) to
    ModelConfig."""
    attn = _attention_config(config)
    refuse(
        config,
        {
            "expansion_ratio": 4,
            "logit_scale": None,
            "norm_type": lambda v: v in (None, "low_precision_layernorm", "layernorm"),
            "ffn_config": lambda v: not v or dict(v).get("ffn_type", "mptmlp") == "mptmlp",
        },
    )
    hidden = integer(config, "d_model", "hidden_size")
    heads = integer(config, "n_heads", "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config d_model={hidden} is not a multiple of n_heads={heads}")
    head_dim = hidden // heads
    clip = number(attn, "clip_qkv", None)
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    layer = LayerSpec(
        attention=AttentionSpec(
            heads,
            heads,
            head_dim,
            scale=number(attn, "softmax_scale", None),
            clip_qkv=clip or None,  # transformers clamps only when clip_qkv is truthy
            alibi_slopes=mpt_alibi_slopes(heads),
        ),
        mlp=MlpSpec("plain", "gelu", 4 * hidden),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return ModelConfig(
        model_type="mpt",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "max_seq_len", default=2048),
        layers=(layer,) * integer(config, "n_layers", "num_hidden_layers"),
        final_norm=norm,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", True)),
        **token_ids(config),
        extra={"no_bias": bool(optional(config, "no_bias", True))},
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → MptForCausalLM tensors (biases only with ``no_bias=false``, where the
    checkpoint has them)."""
    c, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    t = "transformer"
    plan = {
        "embed_tokens": plain(f"{t}.wte.weight", (v, c)),
        "final_norm.weight": plain(f"{t}.norm_f.weight", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    biases = [("final_norm.bias", plain(f"{t}.norm_f.bias", (c,)))]
    for i in range(cfg.num_layers):
        p, role = f"{t}.blocks.{i}", f"layers.{i}"
        fused = f"{p}.attn.Wqkv"
        for index, part in enumerate("qkv"):
            take = rows(index * c, (index + 1) * c)
            plan[f"{role}.{part}.weight"] = sliced_linear(
                f"{fused}.weight", (index * c, (index + 1) * c), 3 * c, c, take, part
            )
            biases.append(
                (f"{role}.{part}.bias", sliced_bias(f"{fused}.bias", 3 * c, c, take, part))
            )
        for place, module, width in (
            ("attn_norm", "norm_1", c),
            ("mlp_norm", "norm_2", c),
        ):
            plan[f"{role}.{place}.weight"] = plain(f"{p}.{module}.weight", (width,))
            biases.append((f"{role}.{place}.bias", plain(f"{p}.{module}.bias", (width,))))
        for r, name, out_f, in_f in (
            ("o", "attn.out_proj", c, c),
            ("mlp.fc", "ffn.up_proj", f, c),
            ("mlp.proj", "ffn.down_proj", c, f),
        ):
            sep = "." if r == "o" else "_"
            plan[f"{role}.{r}{sep}weight"] = linear(f"{p}.{name}.weight", out_f, in_f)
            biases.append((f"{role}.{r}{sep}bias", plain(f"{p}.{name}.bias", (out_f,))))
    if not cfg.extra.get("no_bias", True):
        optional_roles(plan, biases)
    return plan


ARCHITECTURE = Architecture(
    name="mpt",
    hf_architectures=("MptForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    genai_type="mpt",
)
