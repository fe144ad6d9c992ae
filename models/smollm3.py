"""SmolLM3 (SmolLM3ForCausalLM): the Llama graph with NoPE layers.

A layer rotates its queries and keys only where ``no_rope_layers[i]`` is 1 (transformers'
name: 1 = uses RoPE, 0 = NoPE); without that list, every ``no_rope_layer_interval``-th layer
(``(i + 1) % interval == 0``) is NoPE, as ``SmolLM3Config`` builds it. Sliding layers come
from ``layer_types`` (the config writes ``sliding_attention`` for the NoPE layers when
``use_sliding_window`` and ``sliding_window`` are set). q/k/v/o biases (``attention_bias``)
and MLP biases (``mlp_bias``) where the checkpoint has them; GQA; ``head_dim`` may differ from
hidden/heads; tied head by default.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import SLIDING, integer, norm_spec, refuse, rope_spec
from graphattn.models.common import layer_types as read_layer_types
from graphattn.models.ministral import refuse_partial_rotary, with_default_theta
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig

DEFAULT_THETA = 2_000_000.0  # SmolLM3Config.default_theta


def uses_rope(config: Mapping[str, object], count: int) -> list[bool]:
    """Per layer, whether it applies RoPE (``no_rope_layers``, else the interval rule)."""
    listed = config.get("no_rope_layers")
    if listed is None:
        interval = integer(config, "no_rope_layer_interval", default=4)
        if interval < 1:
            raise ValueError(f"config.json no_rope_layer_interval={interval} is not supported")
        return [(i + 1) % interval != 0 for i in range(count)]
    if (
        not isinstance(listed, list)
        or len(listed) < count
        or any(v not in (0, 1) or isinstance(v, float) for v in listed)
    ):
        raise ValueError(
            f"config.json no_rope_layers must list 0/1 for each of {count} layers, got {listed!r}"
        )
    return [bool(v) for v in listed[:count]]


def layer_types(config: Mapping[str, object], rope: list[bool]) -> list[str]:
    """``layer_types``, else SmolLM3Config's rule (NoPE layers slide when windows are on)."""
    if config.get("layer_types") is None:
        sliding = bool(config.get("use_sliding_window")) and config.get("sliding_window")
        return [SLIDING if sliding and not r else "full_attention" for r in rope]
    types = read_layer_types(config, len(rope))
    if SLIDING in types and not config.get("use_sliding_window"):
        # transformers' eager/SDPA masks would slide these layers, its flash path would not
        raise ValueError(
            "config.json layer_types has sliding_attention layers with use_sliding_window="
            f"{config.get('use_sliding_window')!r}: which one holds is ambiguous, not supported"
        )
    return types


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a SmolLM3 ``config.json`` to ModelConfig."""
    refuse(config, llama.LLAMA_REFUSED)
    refuse_partial_rotary(config)
    config = with_default_theta(config, DEFAULT_THETA)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps")
    rope = uses_rope(config, d.layers)
    layers = [
        LayerSpec(
            attention=AttentionSpec(
                d.heads,
                d.kv_heads,
                d.head_dim,
                rope=rope_spec(config, d.head_dim) if has_rope else None,
                window=llama.window_of(config, kind),
            ),
            mlp=llama.swiglu(config, d),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for has_rope, kind in zip(rope, layer_types(config, rope))
    ]
    return llama.model_config(config, "smollm3", layers, norm, tied=True)


ARCHITECTURE = Architecture(
    name="smollm3",
    hf_architectures=("SmolLM3ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=llama.weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="llama",
)
