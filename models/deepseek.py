"""DeepSeek-V2 (incl. V2-Lite) and DeepSeek-V3: multi-head latent attention (MLA) and a
mixture of experts with shared experts, as transformers' ``modeling_deepseek_v2.py`` /
``modeling_deepseek_v3.py`` compute them.

Attention (both): queries from ``q_proj`` or, with ``q_lora_rank``, ``q_b(rms(q_a(x)))``;
``kv_a_proj_with_mqa`` gives the latent ``[kv_lora_rank]`` (RMS-normed by
``kv_a_layernorm``) and one rope key ``[qk_rope_head_dim]`` shared by every head;
``kv_b_proj`` expands the latent into per-head ``k_nope`` / ``v``. Each query/key head is
``[nope | rope]``; RoPE turns the rope part only: interleaved pairs in V2 (complex
multiplication of ``(x0, x1), (x2, x3), ...``) and in V3 with ``rope_interleave`` (the
default), split halves otherwise. The q/kv latent norms use transformers' default epsilon
1e-6 (they are built without ``rms_norm_eps``). Score scale ``qk_head_dim^-0.5``, times
``mscale²`` with ``mscale = 0.1·mscale_all_dim·ln(factor) + 1`` when the RoPE scaling
states ``mscale_all_dim`` (``yarn_apply_mscale``); the scaling's own attention factor
(yarn: ``mscale / mscale_all_dim``) scales cos/sin as for any yarn model.

MLP: layers before ``first_k_dense_replace`` are a SwiGLU of ``intermediate_size``; the
others a MoE of ``n_routed_experts`` experts of ``moe_intermediate_size``, top
``num_experts_per_tok``, plus ``n_shared_experts`` always-on experts (one SwiGLU of
``n_shared_experts × moe_intermediate_size``). Routers (fp32 in transformers):

- V2: softmax scores; ``topk_method`` ``greedy`` (top-k of all) or
  ``group_limited_greedy`` (experts in ``n_group`` groups, the ``topk_group`` groups with the
  best single score stay); weights are the chosen scores × ``routed_scaling_factor``, never
  renormalized (transformers 5 ignores ``norm_topk_prob`` for V2, so True is refused).
- V3 (``noaux_tc``): sigmoid scores; selection by ``score + e_score_correction_bias``;
  groups scored by the sum of their top-2 selection scores; weights are the chosen (unbiased)
  scores, divided by their sum when ``norm_topk_prob``, × ``routed_scaling_factor``.

The checkpoint's MTP module (DeepSeek-V3's ``model.layers.61.*``, ``num_nextn_predict_layers``)
is not part of the decoder and is left out, as transformers does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    finite,
    integer,
    linear,
    norm_spec,
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
    LatentSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    MoeSpec,
    NormSpec,
    WeightSource,
    latent_up,
)

# transformers builds q_a_layernorm / kv_a_layernorm as DeepseekV2RMSNorm(width): eps 1e-6.
LATENT_NORM_EPS = 1e-6

COMMON_REFUSED = {
    "pretraining_tp": lambda v: v in (None, 1),
    "attention_bias": lambda v: v in (None, False),
    "moe_layer_freq": lambda v: v in (None, 1),  # transformers reads only first_k_dense_replace
}
V2_REFUSED = {
    **COMMON_REFUSED,
    "mlp_bias": lambda v: v in (None, False),
    "scoring_func": lambda v: v in (None, "softmax"),
}
V3_REFUSED = {
    **COMMON_REFUSED,
    "scoring_func": lambda v: v in (None, "sigmoid"),
    "topk_method": lambda v: v in (None, "noaux_tc"),
}
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def _latent(config: Mapping[str, object]) -> LatentSpec:
    q_lora_rank = config.get("q_lora_rank")
    return LatentSpec(
        kv_lora_rank=integer(config, "kv_lora_rank"),
        qk_nope_head_dim=integer(config, "qk_nope_head_dim"),
        qk_rope_head_dim=integer(config, "qk_rope_head_dim"),
        v_head_dim=integer(config, "v_head_dim"),
        norm=NormSpec("rms", LATENT_NORM_EPS),
        q_lora_rank=None if q_lora_rank is None else integer(config, "q_lora_rank"),
    )


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def score_scale(config: Mapping[str, object], qk_head_dim: int) -> float:
    """``qk_head_dim^-0.5``, times ``mscale(factor, mscale_all_dim)²`` when the RoPE scaling
    (any type but default) states a nonzero ``mscale_all_dim`` (transformers'
    ``yarn_apply_mscale``)."""
    scale = qk_head_dim**-0.5
    params = rope_parameters(config)
    if params["rope_type"] == "default":
        return scale
    mscale_all_dim = params.get("mscale_all_dim")
    if not mscale_all_dim:
        return scale
    if params.get("factor") is None:
        raise ValueError("config.json rope scaling states mscale_all_dim without 'factor'")
    m = _yarn_mscale(finite("factor", params["factor"]), finite("mscale_all_dim", mscale_all_dim))
    return scale * m * m


def _moe(config: Mapping[str, object], version: int) -> MoeSpec:
    experts = integer(config, "n_routed_experts")
    top_k = integer(config, "num_experts_per_tok")
    size = integer(config, "moe_intermediate_size")
    shared = integer(config, "n_shared_experts", default=0, minimum=0)
    if shared == 0:
        raise ValueError("config.json n_shared_experts=0 is not supported")
    scaling = number(config, "routed_scaling_factor", 1.0)
    if version == 2:
        method = optional(config, "topk_method", "greedy")
        if method not in V2_TOPK_METHODS:
            raise ValueError(
                f"config.json topk_method={method!r} is not supported for deepseek_v2"
                f" (known: {', '.join(V2_TOPK_METHODS)})"
            )
        if optional(config, "norm_topk_prob", False):
            raise ValueError(
                "config.json norm_topk_prob=True is not supported for deepseek_v2 (transformers"
                " ignores it; DeepSeek's own code renormalizes)"
            )
        if method == "greedy":
            groups, topk_groups = 1, 1
        else:
            groups = integer(config, "n_group")
            topk_groups = integer(config, "topk_group")
        spec = MoeSpec(
            num_experts=experts,
            top_k=top_k,
            expert_size=size,
            scores="softmax",
            normalize=False,
            scaling=scaling,
            groups=groups,
            topk_groups=topk_groups,
            group_score="max",
            shared_size=shared * size,
        )
    else:
        groups = integer(config, "n_group", default=1)
        topk_groups = integer(config, "topk_group", default=1)
        if experts % groups == 0 and experts // groups < 2:
            raise ValueError(
                f"config.json n_group={groups} leaves fewer than 2 of the {experts} experts per"
                " group (the group score is the sum of the top 2)"
            )
        spec = MoeSpec(
            num_experts=experts,
            top_k=top_k,
            expert_size=size,
            scores="sigmoid",
            normalize=bool(optional(config, "norm_topk_prob", True)),
            scaling=scaling,
            groups=groups,
            topk_groups=topk_groups,
            group_score="top2_sum",
            shared_size=shared * size,
        )
    if spec.top_k > spec.topk_groups * (spec.num_experts // spec.groups):
        raise ValueError(
            f"config.json num_experts_per_tok={top_k} exceeds the experts of topk_group="
            f"{spec.topk_groups} groups of {spec.num_experts // spec.groups}"
        )
    return spec


def _config_from_hf(config: Mapping[str, object], version: int) -> ModelConfig:
    model_type = f"deepseek_v{version}"
    refuse(config, V2_REFUSED if version == 2 else V3_REFUSED)
    quantized = config.get("quantization_config")
    if quantized is not None:
        method = quantized.get("quant_method") if isinstance(quantized, Mapping) else quantized
        raise ValueError(
            f"config.json quantization_config (quant_method {method!r}) is not supported: export"
            " a checkpoint with float weights (DeepSeek-V3's fp8 blocks dequantized to bf16)"
        )
    hidden = integer(config, "hidden_size")
    heads = integer(config, "num_attention_heads")
    kv_heads = integer(config, "num_key_value_heads", default=heads)
    if kv_heads != heads:
        raise ValueError(
            f"config.json num_key_value_heads={kv_heads} must equal num_attention_heads={heads}"
            " for latent attention (kv_b_proj expands every head)"
        )
    layers = integer(config, "num_hidden_layers")
    latent = _latent(config)
    head_dim = latent.qk_nope_head_dim + latent.qk_rope_head_dim
    interleaved = True if version == 2 else bool(optional(config, "rope_interleave", True))
    rope = rope_spec(config, head_dim, rotary_dim=latent.qk_rope_head_dim, interleaved=interleaved)
    attention = AttentionSpec(
        heads,
        heads,
        head_dim,
        rope=rope,
        scale=score_scale(config, head_dim),
        latent=latent,
    )
    act = activation(config, "hidden_act", "silu", ACTIVATIONS)
    dense_layers = integer(config, "first_k_dense_replace", default=0, minimum=0)
    dense = MlpSpec("gated", act, integer(config, "intermediate_size"))
    moe = _moe(config, version) if dense_layers < layers else None
    norm = norm_spec(config, "rms", "rms_norm_eps")
    specs = [
        LayerSpec(
            attention=attention,
            mlp=dense if i < dense_layers else MlpSpec("moe", act, moe.expert_size, moe=moe),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for i in range(layers)
    ]
    return ModelConfig(
        model_type=model_type,
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        context_length=integer(config, "max_position_embeddings", default=2048),
        layers=tuple(specs),
        final_norm=norm,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", False)),
        **token_ids(config),
    )


def config_from_hf_v2(config: Mapping[str, object]) -> ModelConfig:
    """Map a DeepSeek-V2 / V2-Lite ``config.json`` to ModelConfig."""
    return _config_from_hf(config, 2)


def config_from_hf_v3(config: Mapping[str, object]) -> ModelConfig:
    """Map a DeepSeek-V3 ``config.json`` to ModelConfig."""
    return _config_from_hf(config, 3)


# ------------------------------------------------------------------------------ weights
def _swiglu(plan: dict, role: str, module: str, width: int, hidden: int) -> None:
    """``{role}.gate_weight/up_weight [C, I]``, ``{role}.down_weight [I, C]`` from torch
    Linears ``{module}.gate_proj/up_proj/down_proj``."""
    plan[f"{role}.gate_weight"] = linear(f"{module}.gate_proj.weight", width, hidden)
    plan[f"{role}.up_weight"] = linear(f"{module}.up_proj.weight", width, hidden)
    plan[f"{role}.down_weight"] = linear(f"{module}.down_proj.weight", hidden, width)


def attention_weights(plan: dict, cfg: ModelConfig, i: int) -> None:
    """Layer ``i``'s MLA roles (graph layout ``[in, out]``): ``q`` or ``q_a``/``q_a_norm``/
    ``q_b``; ``kv_a [C, kv_lora_rank + rope]``, ``kv_a_norm``; ``k_up [H, nope, r]`` and
    ``v_up [H, r, v]`` cut from ``kv_b_proj [H·(nope + v), r]``; ``o [H·v, C]``."""
    a = cfg.layers[i].attention
    lat, c, h = a.latent, cfg.hidden_size, a.num_heads
    p, role = f"model.layers.{i}.self_attn", f"layers.{i}"
    q_width = h * a.head_dim
    if lat.q_lora_rank is None:
        plan[f"{role}.q.weight"] = linear(f"{p}.q_proj.weight", q_width, c)
    else:
        plan[f"{role}.q_a.weight"] = linear(f"{p}.q_a_proj.weight", lat.q_lora_rank, c)
        plan[f"{role}.q_a_norm.weight"] = plain(f"{p}.q_a_layernorm.weight", (lat.q_lora_rank,))
        plan[f"{role}.q_b.weight"] = linear(f"{p}.q_b_proj.weight", q_width, lat.q_lora_rank)
    r, nope, rope, v = lat.kv_lora_rank, lat.qk_nope_head_dim, lat.qk_rope_head_dim, lat.v_head_dim
    plan[f"{role}.kv_a.weight"] = linear(f"{p}.kv_a_proj_with_mqa.weight", r + rope, c)
    plan[f"{role}.kv_a_norm.weight"] = plain(f"{p}.kv_a_layernorm.weight", (r,))
    kv_b = f"{p}.kv_b_proj.weight"
    kv_b_shape = (h * (nope + v), r)
    plan[f"{role}.k_up.weight"] = WeightSource(
        f"{kv_b}.k_up", kv_b, kv_b_shape, latent_up("key", h, nope, v), (h, nope, r)
    )
    plan[f"{role}.v_up.weight"] = WeightSource(
        f"{kv_b}.v_up", kv_b, kv_b_shape, latent_up("value", h, nope, v), (h, r, v)
    )
    plan[f"{role}.o.weight"] = linear(f"{p}.o_proj.weight", c, h * v)


def mlp_weights(plan: dict, cfg: ModelConfig, i: int) -> None:
    """Layer ``i``'s MLP roles: a dense SwiGLU (``mlp.gate_weight`` ...) or the MoE's
    ``mlp.router.weight [C, E]``, ``mlp.router.score_bias [E]`` (V3's
    ``e_score_correction_bias``), ``mlp.experts.{e}.*`` and ``mlp.shared.*``."""
    mlp, c = cfg.layers[i].mlp, cfg.hidden_size
    p, role = f"model.layers.{i}.mlp", f"layers.{i}.mlp"
    if mlp.moe is None:
        _swiglu(plan, role, p, mlp.intermediate_size, c)
        return
    moe = mlp.moe
    plan[f"{role}.router.weight"] = linear(f"{p}.gate.weight", moe.num_experts, c)
    if moe.scores == "sigmoid":
        plan[f"{role}.router.score_bias"] = plain(
            f"{p}.gate.e_score_correction_bias", (moe.num_experts,)
        )
    for e in range(moe.num_experts):
        _swiglu(plan, f"{role}.experts.{e}", f"{p}.experts.{e}", moe.expert_size, c)
    _swiglu(plan, f"{role}.shared", f"{p}.shared_experts", moe.shared_size, c)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (DeepseekV2/V3ForCausalLM names)."""
    c, vocab = cfg.hidden_size, cfg.vocab_size
    plan: dict[str, WeightSource] = {
        "embed_tokens": plain("model.embed_tokens.weight", (vocab, c)),
        "final_norm.weight": plain("model.norm.weight", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (vocab, c))
    for i in range(cfg.num_layers):
        for place, module in (
            ("attn_norm", "input_layernorm"),
            ("mlp_norm", "post_attention_layernorm"),
        ):
            plan[f"layers.{i}.{place}.weight"] = plain(f"model.layers.{i}.{module}.weight", (c,))
        attention_weights(plan, cfg, i)
        mlp_weights(plan, cfg, i)
    return plan


V2_ARCHITECTURE = Architecture(
    name="deepseek_v2",
    hf_architectures=("DeepseekV2ForCausalLM",),
    config_from_hf=config_from_hf_v2,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="deepseek_v2",
)
V3_ARCHITECTURE = Architecture(
    name="deepseek_v3",
    hf_architectures=("DeepseekV3ForCausalLM",),
    config_from_hf=config_from_hf_v3,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="deepseek_v3",
    # DeepSeek-V3's multi-token-prediction module, stored as a 62nd layer (transformers
    # ignores it on load too).
    ignored_prefixes=("model.layers.61.",),
)
