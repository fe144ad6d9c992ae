"""Mixtral (MixtralForCausalLM): the Mistral graph with every MLP a sparse mixture of experts,
as transformers' ``modeling_mixtral.py`` computes it.

Attention is Llama's (GQA, split-halves RoPE, no biases); ``sliding_window``, when set,
applies to every layer (Mixtral has no ``layer_types``). Each layer's ``block_sparse_moe``:
router ``gate`` ``[E, C]`` (``num_local_experts``), softmax over the experts, the top
``num_experts_per_tok`` chosen and their probabilities always renormalized to sum to one;
expert ``e`` is a SwiGLU ``w2(act(w1 x) * w3 x)`` of ``intermediate_size`` (``w1`` gate,
``w3`` up, ``w2`` down, as ``save_pretrained`` writes them per expert).

Accepted and not computed: ``router_jitter_noise`` (transformers multiplies the router input
by uniform noise only in training mode), ``router_aux_loss_coef`` and
``output_router_logits`` (the load-balancing loss and its logits are training outputs).
``quantization_config`` is refused (export a float checkpoint).

The pieces here (:func:`moe_spec`, :func:`with_mlps`, :func:`moe_weights`,
:func:`drop_mlp_roles`) are what Qwen2-MoE and Qwen3-MoE compose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from graphattn.models import llama
from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    integer,
    linear,
    refuse,
)
from graphattn.spec import Architecture, MlpSpec, ModelConfig, MoeSpec, WeightSource


def refuse_quantized(config: Mapping[str, object], model_type: str) -> None:
    """ValueError naming ``quantization_config`` when the checkpoint holds quantized
    weights (GPTQ, AWQ, fp8, ...): the export reads float tensors."""
    quantized = config.get("quantization_config")
    if quantized is None:
        return
    method = quantized.get("quant_method") if isinstance(quantized, Mapping) else quantized
    raise ValueError(
        f"config.json quantization_config (quant_method {method!r}) is not supported for"
        f" {model_type}: export a checkpoint with float weights (use --precision for int4/int8)"
    )


# More experts per layer than any published MoE (DeepSeek-V3 256, Qwen3-Next 512) by a margin;
# beyond it the per-expert weight plan would only exhaust memory.
MAX_EXPERTS = 1024


def expert_count(config: Mapping[str, object], *keys: str, minimum: int = 1) -> int:
    """The number of routed experts from the first of ``keys`` present, at most
    MAX_EXPERTS; ValueError naming the key otherwise."""
    count = integer(config, *keys, minimum=minimum)
    if count > MAX_EXPERTS:
        key = next(k for k in keys if config.get(k) is not None)
        raise ValueError(f"config.json {key!r} must be at most {MAX_EXPERTS}, got {count}")
    return count


def moe_spec(
    config: Mapping[str, object],
    *,
    experts: int,
    expert_size: int,
    normalize: bool,
    shared_size: int | None = None,
) -> MlpSpec:
    """A softmax top-``num_experts_per_tok`` MoE MLP of ``experts`` SwiGLU experts (the
    config's ``hidden_act``), renormalized when ``normalize``, with an optional shared expert
    of ``shared_size``."""
    act = activation(config, "hidden_act", "silu", ACTIVATIONS)
    spec = MoeSpec(
        num_experts=experts,
        top_k=integer(config, "num_experts_per_tok"),
        expert_size=expert_size,
        scores="softmax",
        normalize=normalize,
        shared_size=shared_size,
    )
    return MlpSpec("moe", act, expert_size, moe=spec)


def with_mlps(cfg: ModelConfig, mlps: Sequence[MlpSpec], model_type: str) -> ModelConfig:
    """``cfg`` (a dense Llama-shaped mapping) with layer ``i``'s MLP ``mlps[i]`` and its
    ``model_type``."""
    layers = tuple(dataclasses.replace(layer, mlp=m) for layer, m in zip(cfg.layers, mlps))
    return cfg.replace(layers=layers, model_type=model_type)


MIXTRAL_REFUSED = {**llama.LLAMA_REFUSED}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Mixtral ``config.json`` to ModelConfig."""
    refuse(config, MIXTRAL_REFUSED)
    refuse_quantized(config, "mixtral")
    if config.get("layer_types") is not None:
        raise ValueError(
            "config.json layer_types is not supported for mixtral (transformers applies"
            " sliding_window to every layer)"
        )
    dense = llama.config_from_hf(config)
    window = config.get("sliding_window")
    dense = dense.replace_attention(
        window=None if window is None else integer(config, "sliding_window")
    )
    mlp = moe_spec(
        config,
        experts=expert_count(config, "num_local_experts", "num_experts"),
        expert_size=integer(config, "intermediate_size"),
        normalize=True,
    )
    return with_mlps(dense, [mlp] * dense.num_layers, "mixtral")


# ------------------------------------------------------------------------------ weights
def drop_mlp_roles(plan: dict[str, WeightSource], i: int) -> None:
    """Remove layer ``i``'s dense MLP roles (``layers.{i}.mlp.{gate,up,down}_{weight,bias}``)
    that :func:`llama.layer_weights` planned, before the MoE roles replace them."""
    for part in ("gate", "up", "down"):
        for kind in ("weight", "bias"):
            plan.pop(f"layers.{i}.mlp.{part}_{kind}", None)


def gated_roles(
    plan: dict[str, WeightSource],
    role: str,
    module: str,
    names: tuple[str, str, str],
    width: int,
    hidden: int,
) -> None:
    """``{role}.gate_weight`` / ``up_weight`` ``[C, I]`` and ``down_weight`` ``[I, C]`` from
    the torch Linears ``{module}.{gate,up,down}.weight`` named by ``names``."""
    gate, up, down = names
    plan[f"{role}.gate_weight"] = linear(f"{module}.{gate}.weight", width, hidden)
    plan[f"{role}.up_weight"] = linear(f"{module}.{up}.weight", width, hidden)
    plan[f"{role}.down_weight"] = linear(f"{module}.{down}.weight", hidden, width)


def moe_weights(
    plan: dict[str, WeightSource],
    cfg: ModelConfig,
    i: int,
    *,
    module: str,
    expert_names: tuple[str, str, str],
    shared: str | None = None,
    shared_gate: str | None = None,
) -> None:
    """Layer ``i``'s MoE roles (graph layout): ``mlp.router.weight [C, E]`` from
    ``{module}.gate.weight [E, C]``, ``mlp.experts.{e}.*`` from ``{module}.experts.{e}.<names>``,
    the shared expert ``mlp.shared.*`` from ``{module}.{shared}.{gate,up,down}_proj`` and
    its gate ``mlp.shared_gate.weight [C, 1]`` from ``{module}.{shared_gate}.weight [1, C]``."""
    moe, c = cfg.layers[i].mlp.moe, cfg.hidden_size
    role = f"layers.{i}.mlp"
    drop_mlp_roles(plan, i)
    plan[f"{role}.router.weight"] = linear(f"{module}.gate.weight", moe.num_experts, c)
    for e in range(moe.num_experts):
        gated_roles(
            plan, f"{role}.experts.{e}", f"{module}.experts.{e}", expert_names, moe.expert_size, c
        )
    if moe.shared_size is not None:
        names = ("gate_proj", "up_proj", "down_proj")
        gated_roles(plan, f"{role}.shared", f"{module}.{shared}", names, moe.shared_size, c)
    if shared_gate is not None:
        plan[f"{role}.shared_gate.weight"] = linear(f"{module}.{shared_gate}.weight", 1, c)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (MixtralForCausalLM names)."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i)
        moe_weights(
            plan,
            cfg,
            i,
            module=f"model.layers.{i}.block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
        )
    return plan


ARCHITECTURE = Architecture(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="mixtral",
)
