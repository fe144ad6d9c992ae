"""Qwen3-MoE (Qwen3MoeForCausalLM, Qwen3-30B-A3B / 235B-A22B): the Qwen3 graph (RMS q/k norm
per head before RoPE, q/k/v/o biases when ``attention_bias``) with sparse MLPs, as
transformers' ``modeling_qwen3_moe.py`` computes them.

Sparse layers by Qwen2-MoE's rule (``decoder_sparse_step``, ``mlp_only_layers``; the others a
SwiGLU of ``intermediate_size``); router ``mlp.gate``, softmax over ``num_experts``
(``num_local_experts`` in files transformers 5 writes), top ``num_experts_per_tok``,
renormalized when ``norm_topk_prob``; experts ``mlp.experts.{e}.{gate,up,down}_proj`` of
``moe_intermediate_size``; no shared expert. With ``use_sliding_window`` every layer attends
the last ``sliding_window`` positions (transformers' mask for the whole model). Accepted and
not computed (training only): ``router_aux_loss_coef``, ``output_router_logits``. Refused:
``quantization_config`` (Qwen3-30B-A3B-FP8 and the like: export a float checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import llama, mixtral, qwen2_moe, qwen3
from graphattn.models.common import integer, optional, refuse
from graphattn.spec import Architecture, ModelConfig, WeightSource


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Qwen3-MoE ``config.json`` to ModelConfig."""
    refuse(config, llama.LLAMA_REFUSED)
    mixtral.refuse_quantized(config, "qwen3_moe")
    if config.get("layer_types") is not None:
        raise ValueError(
            "config.json layer_types is not supported for qwen3_moe (transformers applies"
            " sliding_window to every layer when use_sliding_window)"
        )
    dense = qwen3.config_from_hf(config)
    if optional(config, "use_sliding_window", False) and config.get("sliding_window"):
        dense = dense.replace_attention(window=integer(config, "sliding_window"))
    mlps = qwen2_moe.layer_mlps(
        config, dense.num_layers, experts_keys=("num_experts", "num_local_experts"), shared=False
    )
    return mixtral.with_mlps(dense, mlps, "qwen3_moe")


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Qwen3's names (``self_attn.q_norm`` / ``k_norm``) plus the MoE roles."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, qk_norms=qwen3.QK_NORMS)
        if cfg.layers[i].mlp.moe is not None:
            mixtral.moe_weights(
                plan,
                cfg,
                i,
                module=f"model.layers.{i}.mlp",
                expert_names=("gate_proj", "up_proj", "down_proj"),
            )
    return plan


ARCHITECTURE = Architecture(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="qwen3_moe",
)
