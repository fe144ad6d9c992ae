"""Gemma (GemmaForCausalLM) and Gemma 2 (Gemma2ForCausalLM).

Both: token embeddings times ``sqrt(hidden_size)`` (transformers casts that factor to the
weights' dtype), RMSNorms that scale by ``1 + w`` in float32 (the ``plus_one`` fix-up),
GeGLU MLPs, ``head_dim`` that may differ from hidden/heads, GQA/MQA, a tied head by default.

- Gemma: pre-norm layers (``input_layernorm`` / ``post_attention_layernorm`` before the
  MLP); ``hidden_act`` (transformers reads a legacy ``"gelu"`` as the tanh approximation).
- Gemma 2: four norms per layer (``post_attention_layernorm`` on the attention output,
  ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP),
  ``hidden_activation``, scores scaled by ``query_pre_attn_scalar ** -0.5`` and capped by
  ``attn_logit_softcapping``, logits capped by ``final_logit_softcapping``, sliding and global
  layers from ``layer_types`` (else transformers' rule: even layers slide).

Refused by name: ``use_bidirectional_attention`` (not causal), ``partial_rotary_factor`` other
than 1 (Gemma's rotary embedding rotates whole heads).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    activation,
    integer,
    layer_types,
    norm_spec,
    number,
    refuse,
    rope_spec,
)
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    NormSpec,
    WeightSource,
    plus_one,
)

# transformers' GemmaConfig turns a legacy hidden_act "gelu" into "gelu_pytorch_tanh".
GEMMA_ACTIVATIONS = {**ACTIVATIONS, "gelu": "gelu_tanh"}
GEMMA_REFUSED = {"use_bidirectional_attention": lambda v: not v}
# Gemma 2/3 norm places → module names.
SANDWICH_NORMS = {
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
IGNORED = (".rotary_emb.inv_freq",)


def stated(config: Mapping[str, object], key: str, default: object) -> object:
    """``config[key]`` when the key is written (an explicit null stays None: no softcap),
    else transformers' default for an absent key."""
    return config[key] if key in config else default


def softcap(config: Mapping[str, object], key: str, default: float | None) -> float | None:
    """A softcap value (None: none), checked like every number."""
    value = stated(config, key, default)
    return None if value is None else number({key: value}, key, None)


def refuse_partial_rotary(config: Mapping[str, object]) -> None:
    """Gemma's rotary embedding rotates whole heads: a ``partial_rotary_factor`` (top level or
    in any ``rope_parameters`` entry) other than 1 is refused by name."""
    params = config.get("rope_parameters")
    values = [config.get("partial_rotary_factor")]
    if isinstance(params, Mapping):
        values.append(params.get("partial_rotary_factor"))
        values += [
            v.get("partial_rotary_factor") for v in params.values() if isinstance(v, Mapping)
        ]
    for value in values:
        if value is not None and value != 1:
            raise ValueError(f"config.json partial_rotary_factor={value!r} is not supported")


def gemma_dims(config: Mapping[str, object]) -> llama.Dims:
    """Sizes; ``num_key_value_heads`` and ``head_dim`` must be written (transformers' defaults
    for them differ between Gemma versions and are not hidden/heads)."""
    integer(config, "num_key_value_heads")
    integer(config, "head_dim")
    return llama.dims(config)


def gelu_mlp(config: Mapping[str, object], d: llama.Dims, key: str, known) -> MlpSpec:
    """The GeGLU MLP (``act(x W_gate) * (x W_up)``) with the config's activation."""
    return MlpSpec("gated", activation(config, key, "gelu_pytorch_tanh", known), d.intermediate)


def embedding_scale(config: Mapping[str, object]) -> float:
    """``sqrt(hidden_size)``; the builder casts it to the activations' dtype as transformers
    does (``embed_scale.to(weight.dtype)``)."""
    return math.sqrt(integer(config, "hidden_size"))


def gemma_model(
    config: Mapping[str, object], model_type: str, layers: list[LayerSpec], norm: NormSpec, **kw
) -> ModelConfig:
    """The model-wide part: embedding scale, tied head by default."""
    return llama.model_config(
        config, model_type, layers, norm, tied=True, embedding_scale=embedding_scale(config), **kw
    )


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Gemma ``config.json`` to ModelConfig."""
    refuse(config, GEMMA_REFUSED)
    refuse_partial_rotary(config)
    d = gemma_dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps")
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads, d.kv_heads, d.head_dim, rope=rope_spec(config, d.head_dim)
        ),
        mlp=gelu_mlp(config, d, "hidden_act", GEMMA_ACTIVATIONS),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return gemma_model(config, "gemma", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Llama's names; every norm weight read as ``1 + w``."""
    plan = llama.model_weights(cfg, norm_fix=plus_one)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, norm_fix=plus_one)
    return plan


# --------------------------------------------------------------------------- Gemma 2
def alternating_types(config: Mapping[str, object], count: int, pattern: int) -> list[str]:
    """``layer_types``, else transformers' rule: layer i slides unless ``(i + 1) % pattern == 0``
    (Gemma 2: pattern 2; Gemma 3: ``sliding_window_pattern``, default 6)."""
    if config.get("layer_types") is not None:
        return layer_types(config, count)
    return [SLIDING if (i + 1) % pattern else FULL for i in range(count)]


def gemma2_attention(config: Mapping[str, object], d: llama.Dims, kind: str, **kw):
    """Gemma 2/3 attention: ``query_pre_attn_scalar ** -0.5`` scale, window on sliding layers."""
    scalar = number(config, "query_pre_attn_scalar", 256.0)
    if scalar <= 0:
        raise ValueError(f"config.json query_pre_attn_scalar={scalar!r} is not supported")
    return AttentionSpec(
        d.heads,
        d.kv_heads,
        d.head_dim,
        window=integer(config, "sliding_window", default=4096) if kind == SLIDING else None,
        scale=scalar**-0.5,
        **kw,
    )


def gemma2_config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Gemma 2 ``config.json`` to ModelConfig."""
    refuse(config, GEMMA_REFUSED)
    refuse_partial_rotary(config)
    d = gemma_dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps")
    rope = rope_spec(config, d.head_dim)
    cap = softcap(config, "attn_logit_softcapping", 50.0)
    mlp = gelu_mlp(config, d, "hidden_activation", ACTIVATIONS)
    layers = [
        LayerSpec(
            attention=gemma2_attention(config, d, kind, rope=rope, softcap=cap),
            mlp=mlp,
            norms=dict.fromkeys(SANDWICH_NORMS, norm),
        )
        for kind in alternating_types(config, d.layers, 2)
    ]
    final = softcap(config, "final_logit_softcapping", 30.0)
    return gemma_model(config, "gemma2", layers, norm, final_softcap=final)


def gemma2_weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Llama's names plus the pre/post feed-forward norms; every norm read as ``1 + w``."""
    plan = llama.model_weights(cfg, norm_fix=plus_one)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, norms=SANDWICH_NORMS, norm_fix=plus_one)
    return plan


ARCHITECTURE = Architecture(
    name="gemma",
    hf_architectures=("GemmaForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=IGNORED,
    genai_type="gemma",
)

GEMMA2_ARCHITECTURE = Architecture(
    name="gemma2",
    hf_architectures=("Gemma2ForCausalLM",),
    config_from_hf=gemma2_config_from_hf,
    weights=gemma2_weights,
    ignored=IGNORED,
    genai_type="gemma2",
)
