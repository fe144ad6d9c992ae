"""GLM (GlmForCausalLM, model_type ``glm``: GLM-4-9B-0414-style checkpoints in transformers).

The Llama graph with three differences, all from ``modeling_glm.py``:

- partial, interleaved RoPE: the first ``int(head_dim * partial_rotary_factor)`` channels of
  each head rotate (``partial_rotary_factor`` defaults to 0.5), as pairs ``(2i, 2i + 1)`` with
  frequency ``i`` (``rotate_half`` takes ``x[0::2]`` / ``x[1::2]`` and cos/sin are
  ``repeat_interleave``'d); the other channels pass through;
- a fused ``mlp.gate_up_proj [2F, C]``: rows ``0:F`` are the gate, ``F:2F`` the up
  projection (``chunk(2)``), cut at export time;
- q/k/v biases (``attention_bias``, default true; read where the checkpoint has them),
  no ``o_proj`` bias.

``head_dim`` may differ from hidden/heads; GQA; sliding windows from ``layer_types`` are not
part of GLM (``GlmModel`` builds only the causal mask), so every layer attends the whole past.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import norm_spec, optional, refuse, rope_spec, sliced_linear
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig, rows

DEFAULT_PARTIAL = 0.5  # GlmConfig: partial_rotary_factor set for backward compatibility


def partial_rotary(config: Mapping[str, object]) -> float:
    """``partial_rotary_factor`` from ``rope_parameters`` (where transformers 5 writes it), else
    the top level, else GLM's default 0.5."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return float(optional(config, "partial_rotary_factor", DEFAULT_PARTIAL))


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a GLM ``config.json`` to ModelConfig."""
    refuse(config, llama.LLAMA_REFUSED)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps")
    rotary = int(d.head_dim * partial_rotary(config))
    if rotary % 2 or rotary < 2:
        raise ValueError(
            f"config.json partial_rotary_factor={partial_rotary(config)!r} gives an odd or empty "
            f"rotary width {rotary} of head_dim={d.head_dim}: not supported"
        )
    rope = rope_spec(config, d.head_dim, interleaved=True, rotary_dim=rotary)
    layers = [
        LayerSpec(
            attention=AttentionSpec(d.heads, d.kv_heads, d.head_dim, rope=rope),
            mlp=llama.swiglu(config, d),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for _ in range(d.layers)
    ]
    return llama.model_config(config, "glm", layers, norm)


def weights(cfg: ModelConfig) -> dict:
    """Llama's names, with the MLP's gate and up projections cut from ``gate_up_proj``."""
    plan = llama.model_weights(cfg)
    c = cfg.hidden_size
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, biases=("q", "k", "v"))
        f = cfg.layers[i].mlp.intermediate_size
        fused = f"model.layers.{i}.mlp.gate_up_proj.weight"
        for part, (start, stop) in (("gate", (0, f)), ("up", (f, 2 * f))):
            plan[f"layers.{i}.mlp.{part}_weight"] = sliced_linear(
                fused, (start, stop), 2 * f, c, rows(start, stop), part
            )
        for role in ("gate_bias", "up_bias"):  # gate_proj / up_proj do not exist here
            plan.pop(f"layers.{i}.mlp.{role}", None)
    return plan


ARCHITECTURE = Architecture(
    name="glm",
    hf_architectures=("GlmForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="llama",
)
