"""Qwen2-MoE (Qwen2MoeForCausalLM, Qwen1.5-MoE / Qwen2-57B-A14B): the Qwen2 graph (q/k/v
biases when ``qkv_bias``) with sparse MLPs, as transformers' ``modeling_qwen2_moe.py``
computes them.

Layer ``i`` is sparse when ``num_experts > 0``, ``(i + 1) % decoder_sparse_step == 0`` and
``i`` is not in ``mlp_only_layers``; the other layers are a SwiGLU of ``intermediate_size``.
A sparse layer: router ``mlp.gate`` ``[E, C]``, softmax over the ``num_experts``, the top
``num_experts_per_tok`` weighted by their probabilities (divided by their sum when
``norm_topk_prob``), experts ``mlp.experts.{e}.{gate,up,down}_proj`` of
``moe_intermediate_size``; plus the shared expert ``mlp.shared_expert`` (a SwiGLU of
``shared_expert_intermediate_size``) scaled by ``sigmoid(x · shared_expert_gate)``.

Sliding windows: ``layer_types`` when the file states it, else transformers' rule (with
``use_sliding_window``: the layers ``i < max_window_layers`` with even ``i``); a sliding layer
attends the last ``sliding_window`` positions. Accepted and not computed (training only):
``router_aux_loss_coef``, ``output_router_logits``. Refused: ``quantization_config``,
``shared_expert_intermediate_size`` 0, sliding layers without ``use_sliding_window``.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import llama, mixtral
from graphattn.models.common import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    activation,
    integer,
    optional,
    refuse,
)
from graphattn.spec import Architecture, MlpSpec, ModelConfig, WeightSource


def sparse_layers(config: Mapping[str, object], count: int, experts: int) -> list[bool]:
    """Which of ``count`` layers are sparse, by transformers' Qwen-MoE rule: ``experts > 0``,
    ``(i + 1) % decoder_sparse_step == 0`` and ``i`` not in ``mlp_only_layers``."""
    step = integer(config, "decoder_sparse_step", default=1)
    dense = optional(config, "mlp_only_layers", [])
    if not isinstance(dense, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in dense
    ):
        raise ValueError(
            f"config.json mlp_only_layers must list layer indices below {count}, got {dense!r}"
        )
    return [experts > 0 and (i + 1) % step == 0 and i not in dense for i in range(count)]


def layer_mlps(
    config: Mapping[str, object], count: int, *, experts_keys: tuple[str, ...], shared: bool
) -> list[MlpSpec]:
    """Each layer's MLP: a dense SwiGLU of ``intermediate_size`` or the softmax top-k MoE of
    ``moe_intermediate_size`` experts (``norm_topk_prob``, default False), with the shared
    expert of ``shared_expert_intermediate_size`` when ``shared``."""
    experts = mixtral.expert_count(config, *experts_keys, minimum=0)
    sparse = sparse_layers(config, count, experts)
    act = activation(config, "hidden_act", "silu", ACTIVATIONS)
    dense = MlpSpec("gated", act, integer(config, "intermediate_size"))
    if not any(sparse):
        return [dense] * count
    shared_size = None
    if shared:
        shared_size = integer(config, "shared_expert_intermediate_size", minimum=0)
        if shared_size == 0:
            raise ValueError("config.json shared_expert_intermediate_size=0 is not supported")
    moe = mixtral.moe_spec(
        config,
        experts=experts,
        expert_size=integer(config, "moe_intermediate_size"),
        normalize=bool(optional(config, "norm_topk_prob", False)),
        shared_size=shared_size,
    )
    return [moe if s else dense for s in sparse]


def qwen2_layer_types(config: Mapping[str, object], count: int) -> object:
    """``layer_types`` as transformers' Qwen2MoeConfig fills it when the file does not state
    it: sliding for even ``i < max_window_layers`` when ``use_sliding_window``."""
    use = bool(optional(config, "use_sliding_window", False))
    types = config.get("layer_types")
    if types is not None:  # checked by llama.config_from_hf (common.layer_types)
        if isinstance(types, list) and SLIDING in types and not use:
            raise ValueError(
                "config.json layer_types has sliding_attention layers but use_sliding_window is"
                " false (transformers then sets sliding_window to 0)"
            )
        return types
    below = integer(config, "max_window_layers", default=28, minimum=0)
    return [SLIDING if use and (i + 1) % 2 and i < below else FULL for i in range(count)]


QWEN2_MOE_REFUSED = {**llama.LLAMA_REFUSED}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Qwen2-MoE ``config.json`` to ModelConfig."""
    refuse(config, QWEN2_MOE_REFUSED)
    mixtral.refuse_quantized(config, "qwen2_moe")
    count = integer(config, "num_hidden_layers")
    dense = llama.config_from_hf({**config, "layer_types": qwen2_layer_types(config, count)})
    mlps = layer_mlps(config, count, experts_keys=("num_experts",), shared=True)
    return mixtral.with_mlps(dense, mlps, "qwen2_moe")


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (Qwen2MoeForCausalLM names; q/k/v biases where the
    checkpoint has them)."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i)
        if cfg.layers[i].mlp.moe is not None:
            mixtral.moe_weights(
                plan,
                cfg,
                i,
                module=f"model.layers.{i}.mlp",
                expert_names=("gate_proj", "up_proj", "down_proj"),
                shared="shared_expert",
                shared_gate="shared_expert_gate",
            )
    return plan


ARCHITECTURE = Architecture(
    name="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="qwen2_moe",
)
