"""Ministral (MinistralForCausalLM): the Llama graph with per-layer sliding windows.

``layer_types`` says which layers slide (transformers writes it: every layer
``sliding_attention`` when ``sliding_window`` is set, unless the file lists its own pattern);
``head_dim`` may differ from hidden/heads; no projection or MLP biases (none are read unless
the checkpoint has them).

Also here: two small checks the other Llama-variant files (SmolLM3, Helium) share.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import FULL, SLIDING, layer_types, norm_spec, refuse, rope_spec
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig


def with_default_theta(config: Mapping[str, object], theta: float) -> Mapping[str, object]:
    """``config`` with the family's RoPE base (transformers' ``default_theta``) when the file
    states none (neither ``rope_theta`` nor ``rope_parameters.rope_theta``)."""
    params = config.get("rope_parameters")
    stated = isinstance(params, Mapping) and params.get("rope_theta") is not None
    if stated or config.get("rope_theta") is not None:
        return config
    return {**config, "rope_theta": theta}


def refuse_partial_rotary(config: Mapping[str, object]) -> None:
    """Families whose default RoPE rotates the whole head (their rotary embedding ignores
    ``partial_rotary_factor``, and a scaled one with it would not match the head width in
    transformers): a factor other than 1 is refused by name."""
    params = config.get("rope_parameters")
    values = [config.get("partial_rotary_factor")]
    if isinstance(params, Mapping):
        values.append(params.get("partial_rotary_factor"))
    for value in values:
        if value is not None and value != 1:
            raise ValueError(f"config.json partial_rotary_factor={value!r} is not supported")


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Ministral ``config.json`` to ModelConfig."""
    refuse(config, llama.LLAMA_REFUSED)
    refuse_partial_rotary(config)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps")
    default_type = SLIDING if config.get("sliding_window") is not None else FULL
    layers = [
        LayerSpec(
            attention=AttentionSpec(
                d.heads,
                d.kv_heads,
                d.head_dim,
                rope=rope_spec(config, d.head_dim),
                window=llama.window_of(config, kind),
            ),
            mlp=llama.swiglu(config, d),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for kind in layer_types(config, d.layers, default_type)
    ]
    return llama.model_config(config, "ministral", layers, norm)


ARCHITECTURE = Architecture(
    name="ministral",
    hf_architectures=("MinistralForCausalLM",),
    config_from_hf=config_from_hf,
    weights=llama.weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="mistral",
)
