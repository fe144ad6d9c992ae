"""Falcon (FalconForCausalLM): both decoder architectures.

Old (``new_decoder_architecture=false``, Falcon-7B / RW): multi-query (one KV head,
``multi_query``) or multi-head attention, ``parallel_attn`` (one ``input_layernorm`` feeds
attention and MLP, parallel residual) or sequential (``post_attention_layernorm``). New
(Falcon-40B/180B): GQA with ``num_kv_heads``, parallel residual, ``ln_attn`` / ``ln_mlp``
(``num_ln_in_parallel_attn=2``) or one shared ``input_layernorm`` (``1``). Every layout of the
fused ``query_key_value [kv·(heads/kv + 2)·head_dim, C]`` is grouped per KV head: each group
holds its ``heads/kv`` query heads, then its key, then its value (MHA: ``[q k v]`` per head;
MQA: all queries, then k, then v). LayerNorm, GELU MLP ``dense_h_to_4h`` / ``dense_4h_to_h``,
biases everywhere when ``bias``, tied head by default.

Positions: rotary on the whole head (``rope_parameters``, every scaling the graph has) or
ALiBi (``alibi``). Falcon's ALiBi is added before the ``1/sqrt(head_dim)`` score scale and its
slopes are rounded to bfloat16 (as transformers and the original code build them): both are
folded into the slopes. transformers also rounds each ``slope · position`` product to
bfloat16, which is exact when the slope is a power of two (heads ≤ 8) and positions < 256;
otherwise its bias carries that rounding and ours does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    alibi_slopes,
    integer,
    linear,
    number,
    optional,
    plain,
    refuse,
    rope_parameters,
    rope_spec,
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
    compose,
    transpose,
)


def _bfloat16(value: float) -> float:
    """``value`` rounded to bfloat16 (round to nearest even), as torch's ``.bfloat16()``."""
    bits = int(np.array(value, np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.array(bits, np.uint32).view(np.float32))


def falcon_alibi_slopes(heads: int, head_dim: int) -> tuple[float, ...]:
    """Falcon's slopes: Bloom's, rounded to bfloat16, divided by ``sqrt(head_dim)`` (its bias
    is added to the unscaled scores)."""
    return tuple(_bfloat16(s) / math.sqrt(head_dim) for s in alibi_slopes(heads))


def _architecture(config: Mapping[str, object]) -> tuple[bool, bool, int | None]:
    """``(new_decoder_architecture, parallel, num_ln_in_parallel_attn)``, refusing the
    combinations transformers cannot run."""
    new = bool(optional(config, "new_decoder_architecture", False))
    parallel = bool(optional(config, "parallel_attn", True))
    num_ln = config.get("num_ln_in_parallel_attn")
    if num_ln is not None and num_ln not in (1, 2):
        raise ValueError(f"config.json num_ln_in_parallel_attn={num_ln!r} is not supported")
    if new:
        if not parallel:
            raise ValueError(
                "config.json parallel_attn=false is not supported with new_decoder_architecture"
            )
        return new, parallel, 2 if num_ln is None else int(num_ln)
    if parallel and num_ln == 2:
        raise ValueError(
            "config.json num_ln_in_parallel_attn=2 is not supported without"
            " new_decoder_architecture"
        )
    return new, parallel, None


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Falcon ``config.json`` to ModelConfig."""
    # The RW code's post-layernorm residual; transformers' Falcon has no such path.
    refuse(config, {"apply_residual_connection_post_layernorm": False})
    new, parallel, num_ln = _architecture(config)
    hidden = integer(config, "hidden_size", "n_embed")
    heads = integer(config, "num_attention_heads")
    if hidden % heads:
        raise ValueError(
            f"config hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
        )
    head_dim = hidden // heads
    if new:
        kv_heads = integer(config, "num_kv_heads", default=heads)
    elif bool(optional(config, "multi_query", True)):
        kv_heads = 1
    else:
        kv_heads = heads
        # transformers reshapes the per-head keys to num_kv_heads heads: only heads fits.
        refuse(config, {"num_kv_heads": heads})
    if heads % kv_heads:
        raise ValueError(f"config num_kv_heads={kv_heads} must divide num_attention_heads={heads}")
    if bool(optional(config, "alibi", False)):
        positions = {"alibi_slopes": falcon_alibi_slopes(heads, head_dim)}
    else:
        # Falcon's rotary covers the whole head (its default RoPE ignores a partial factor).
        partial = rope_parameters(config).get(
            "partial_rotary_factor", optional(config, "partial_rotary_factor", 1.0)
        )
        if partial != 1.0:
            raise ValueError(f"config.json partial_rotary_factor={partial!r} is not supported")
        positions = {"rope": rope_spec(config, head_dim, partial=1.0)}
    norm = NormSpec("layer", number(config, "layer_norm_epsilon", 1e-5))
    if not parallel:
        norms = {"attn_norm": norm, "mlp_norm": norm}
    elif num_ln == 2:
        norms = {"attn_norm": norm, "mlp_norm": norm}
    else:
        norms = {"attn_norm": norm}  # the MLP reads the attention norm's output
    layer = LayerSpec(
        attention=AttentionSpec(heads, kv_heads, head_dim, **positions),
        mlp=MlpSpec(
            "plain",
            activation(config, "activation", "gelu", ACTIVATIONS),
            integer(config, "ffn_hidden_size", default=4 * hidden),
        ),
        norms=norms,
        residual="parallel" if parallel else "sequential",
    )
    return ModelConfig(
        model_type="falcon",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "max_position_embeddings", default=2048),
        layers=(layer,) * integer(config, "num_hidden_layers"),
        final_norm=norm,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", True)),
        **token_ids(config),
        extra={
            "bias": bool(optional(config, "bias", False)),
            "norm_modules": _norm_modules(new, parallel, num_ln),
        },
    )


def _norm_modules(new: bool, parallel: bool, num_ln: int | None) -> dict[str, str]:
    """Norm place → Falcon module name."""
    if not parallel:
        return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if new and num_ln == 2:
        return {"attn_norm": "ln_attn", "mlp_norm": "ln_mlp"}
    return {"attn_norm": "input_layernorm"}


def kv_group_rows(start: int, stop: int, parts: int, groups: int) -> Transform:
    """Rows of parts ``start:stop`` of a fused projection grouped per KV head
    (``[groups, parts, head_dim]`` along dim 0), in group order."""

    def take(array: np.ndarray) -> np.ndarray:
        grouped = array.reshape(groups, parts, -1, *array.shape[1:])
        return np.ascontiguousarray(grouped[:, start:stop].reshape(-1, *array.shape[1:]))

    take.__name__ = f"kv_group_rows_{start}_{stop}_of_{parts}"
    return take


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → FalconForCausalLM tensors."""
    c, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    heads, kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    bias = bool(cfg.extra.get("bias", False))
    group = heads // kv
    fused_rows = kv * (group + 2) * d
    t = "transformer"
    plan = {
        "embed_tokens": plain(f"{t}.word_embeddings.weight", (v, c)),
        "final_norm.weight": plain(f"{t}.ln_f.weight", (c,)),
        "final_norm.bias": plain(f"{t}.ln_f.bias", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    parts = {"q": (0, group), "k": (group, group + 1), "v": (group + 1, group + 2)}
    for i in range(cfg.num_layers):
        p, role = f"{t}.h.{i}", f"layers.{i}"
        for place, module in cfg.extra["norm_modules"].items():
            plan[f"{role}.{place}.weight"] = plain(f"{p}.{module}.weight", (c,))
            plan[f"{role}.{place}.bias"] = plain(f"{p}.{module}.bias", (c,))
        fused = f"{p}.self_attention.query_key_value"
        for part, (start, stop) in parts.items():
            take = kv_group_rows(start, stop, group + 2, kv)
            width = (stop - start) * kv * d
            plan[f"{role}.{part}.weight"] = WeightSource(
                f"{fused}.weight.{part}",
                f"{fused}.weight",
                (fused_rows, c),
                compose(take, transpose),
                (c, width),
            )
            if bias:
                plan[f"{role}.{part}.bias"] = WeightSource(
                    f"{fused}.bias.{part}", f"{fused}.bias", (fused_rows,), take, (width,)
                )
        plan[f"{role}.o.weight"] = linear(f"{p}.self_attention.dense.weight", c, c)
        plan[f"{role}.mlp.fc_weight"] = linear(f"{p}.mlp.dense_h_to_4h.weight", f, c)
        plan[f"{role}.mlp.proj_weight"] = linear(f"{p}.mlp.dense_4h_to_h.weight", c, f)
        if bias:
            plan[f"{role}.o.bias"] = plain(f"{p}.self_attention.dense.bias", (c,))
            plan[f"{role}.mlp.fc_bias"] = plain(f"{p}.mlp.dense_h_to_4h.bias", (f,))
            plan[f"{role}.mlp.proj_bias"] = plain(f"{p}.mlp.dense_4h_to_h.bias", (c,))
    return plan


ARCHITECTURE = Architecture(
    name="falcon",
    hf_architectures=("FalconForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="falcon",
)
