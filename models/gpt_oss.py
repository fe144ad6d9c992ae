"""GPT-OSS (GptOssForCausalLM): Llama-shaped attention with learned attention sinks, layers
alternating sliding/full (``layer_types``, ``sliding_window``), yarn RoPE, q/k/v/o biases, and
a mixture of experts in every layer.

Attention: ``self_attn.sinks [H]`` is one logit per query head in every row's softmax
(:attr:`AttentionSpec.sinks`; weight role ``layers.{i}.sinks``). MLP: router ``logits = x
W_router + b`` ``[N, E]``, the top ``num_experts_per_tok`` logits softmaxed among themselves
(= softmax over all experts, top-k, renormalized: ``MoeSpec(scores="softmax",
normalize=True)``); each expert the clamped SwiGLU ``(clip(up, ±limit) + 1) · g σ(α g)``,
``g = min(gate, limit)`` (``swiglu_limit``, ``swiglu_alpha``) with biases.

Checkpoint layout (transformers 5): the experts are fused per layer,
``mlp.experts.gate_up_proj [E, C, 2I]`` (already ``[in, out]``; gate and up interleaved along
the last axis: gate = ``[..., ::2]``, up = ``[..., 1::2]``), ``gate_up_proj_bias [E, 2I]``,
``down_proj [E, I, C]``, ``down_proj_bias [E, C]``; the plan slices them per expert at export
time. Hub checkpoints (openai/gpt-oss-20b, -120b) store the experts as MXFP4 blocks
(``quantization_config.quant_method = "mxfp4"``): refused with a message saying how to get a
dequantized checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphattn.models import llama
from graphattn.models.common import (
    FULL,
    SLIDING,
    integer,
    layer_types,
    linear,
    norm_spec,
    number,
    optional_roles,
    plain,
    refuse,
    rope_spec,
)
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    MoeSpec,
    Transform,
    WeightSource,
)

REFUSED = {
    # transformers' GptOssExperts always applies its clamped SwiGLU; any other act is unused
    "hidden_act": lambda v: v in (None, "silu"),
    "pretraining_tp": lambda v: v in (None, 1),
}


def _refuse_quantized(config: Mapping[str, object]) -> None:
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, Mapping) else None
    raise ValueError(
        f"config.json quantization_config (quant_method {method!r}) is not supported: the"
        " GPT-OSS checkpoints on the Hugging Face hub store their experts as MXFP4 blocks;"
        " export from a dequantized checkpoint instead (transformers: from_pretrained(...,"
        " quantization_config=Mxfp4Config(dequantize=True)), then save_pretrained), and pick"
        " --precision int4/int8 here"
    )


def default_layer_types(count: int) -> list[str]:
    """transformers' default when ``layer_types`` is absent: even layers sliding, odd full."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(count)]


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a GPT-OSS ``config.json`` to ModelConfig."""
    _refuse_quantized(config)
    refuse(config, REFUSED)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps", default=1e-5)
    experts = integer(config, "num_local_experts", "num_experts")
    moe = MoeSpec(
        num_experts=experts,
        top_k=integer(config, "num_experts_per_tok"),
        expert_size=d.intermediate,
        scores="softmax",
        normalize=True,
        swiglu_limit=number(config, "swiglu_limit", 7.0),
        swiglu_alpha=number(config, "swiglu_alpha", 1.702),
    )
    types = config.get("layer_types")
    kinds = default_layer_types(d.layers) if types is None else layer_types(config, d.layers)
    layers = [
        LayerSpec(
            attention=AttentionSpec(
                d.heads,
                d.kv_heads,
                d.head_dim,
                rope=rope_spec(config, d.head_dim),
                window=llama.window_of(config, kind),
                sinks=True,
            ),
            mlp=MlpSpec("moe", "silu", d.intermediate, moe=moe),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for kind in kinds
    ]
    return llama.model_config(config, "gpt_oss", layers, norm)


# ------------------------------------------------------------------------------ weights
def expert_slice(expert: int, part: str) -> Transform:
    """Expert ``expert``'s ``part`` of a fused expert tensor (first axis = expert): ``gate``
    (even columns of the last axis), ``up`` (odd columns) or ``all``."""
    step = {"gate": slice(0, None, 2), "up": slice(1, None, 2), "all": slice(None)}[part]

    def take(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array[expert][..., step])

    take.__name__ = f"expert_{expert}_{part}"
    return take


def layer_weights(plan: dict[str, WeightSource], cfg: ModelConfig, i: int) -> None:
    """Layer ``i``'s roles: norms, q/k/v/o (+ biases), sinks, router and per-expert slices."""
    layer = cfg.layers[i]
    a, c = layer.attention, cfg.hidden_size
    moe = layer.mlp.moe
    e, f = moe.num_experts, moe.expert_size
    p, role = f"model.layers.{i}", f"layers.{i}"
    plan[f"{role}.attn_norm.weight"] = plain(f"{p}.input_layernorm.weight", (c,))
    plan[f"{role}.mlp_norm.weight"] = plain(f"{p}.post_attention_layernorm.weight", (c,))
    widths = {"q": a.num_heads * a.head_dim, "k": a.kv_heads * a.head_dim}
    widths["v"] = widths["k"]
    for part, width in widths.items():
        plan[f"{role}.{part}.weight"] = linear(f"{p}.self_attn.{part}_proj.weight", width, c)
    plan[f"{role}.o.weight"] = linear(f"{p}.self_attn.o_proj.weight", c, widths["q"])
    bias_widths = {**widths, "o": c}
    optional_roles(
        plan,
        (
            (f"{role}.{part}.bias", plain(f"{p}.self_attn.{part}_proj.bias", (width,)))
            for part, width in bias_widths.items()
        ),
    )
    plan[f"{role}.sinks"] = plain(f"{p}.self_attn.sinks", (a.num_heads,))
    m, r = f"{p}.mlp", f"{role}.mlp"
    plan[f"{r}.router.weight"] = linear(f"{m}.router.weight", e, c)
    plan[f"{r}.router.bias"] = plain(f"{m}.router.bias", (e,))
    fused = {
        "gate_up_proj": (e, c, 2 * f),
        "gate_up_proj_bias": (e, 2 * f),
        "down_proj": (e, f, c),
        "down_proj_bias": (e, c),
    }
    pieces = {  # role suffix: (fused tensor, part, graph shape)
        "gate_weight": ("gate_up_proj", "gate", (c, f)),
        "up_weight": ("gate_up_proj", "up", (c, f)),
        "down_weight": ("down_proj", "all", (f, c)),
        "gate_bias": ("gate_up_proj_bias", "gate", (f,)),
        "up_bias": ("gate_up_proj_bias", "up", (f,)),
        "down_bias": ("down_proj_bias", "all", (c,)),
    }
    for expert in range(e):
        for suffix, (tensor, part, shape) in pieces.items():
            source = f"{m}.experts.{tensor}"
            plan[f"{r}.experts.{expert}.{suffix}"] = WeightSource(
                f"{source}.{expert}.{part}",
                source,
                fused[tensor],
                expert_slice(expert, part),
                shape,
            )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (GptOssForCausalLM names)."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        layer_weights(plan, cfg, i)
    return plan


ARCHITECTURE = Architecture(
    name="gpt_oss",
    hf_architectures=("GptOssForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="gpt_oss",
)
