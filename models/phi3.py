"""Phi-3 (Phi3ForCausalLM): the Llama graph with fused projections and LongRoPE.

``qkv_proj`` ``[H·D + 2·Hkv·D, C]`` holds the q, k and v rows one after the other (of unequal
width under GQA) and ``gate_up_proj`` ``[2F, C]`` the gate rows then the up rows: each role is
a row slice composed with the transpose. ``sliding_window`` (when set) windows every layer;
``partial_rotary_factor`` (Phi-4-mini) rotates the first channels of each head.

RoPE is the default one or ``longrope`` (transformers' Phi3Config renames the old ``su`` and
``yarn`` types to ``longrope``): a call whose ``max(position_ids) + 1`` exceeds the top-level
``original_max_position_embeddings`` (4096 when absent, as Phi3Config's default) uses
``long_factor``, otherwise ``short_factor``, with cos/sin scaled by the attention factor.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import (
    integer,
    linear,
    norm_spec,
    optional,
    plain,
    refuse,
    rope_parameters,
    rope_spec,
    sliced_linear,
)
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    ModelConfig,
    WeightSource,
    rows,
)

# Phi3Config's defaults for keys a config.json may leave out.
ORIGINAL_CONTEXT = 4096
CONTEXT = 4096
# Types Phi3Config accepts (it renames "su" and "yarn" to "longrope" as it loads).
ROPE_TYPES = {"default": "default", "longrope": "longrope", "su": "longrope", "yarn": "longrope"}
# Phi3ForCausalLM has no biases: a config announcing them describes another model.
REFUSED = {
    "attention_bias": lambda v: not v,
    "mlp_bias": lambda v: not v,
    "lm_head_bias": lambda v: not v,
}


def _renamed_rope(config: Mapping[str, object]) -> dict:
    """``config`` with Phi3Config's RoPE renaming applied (``su`` / ``yarn`` → ``longrope``)
    and its defaults for ``max_position_embeddings`` / ``original_max_position_embeddings``."""
    fixed = dict(config)
    fixed.setdefault("max_position_embeddings", CONTEXT)
    if fixed.get("original_max_position_embeddings") is None:
        fixed["original_max_position_embeddings"] = ORIGINAL_CONTEXT
    for key in ("rope_scaling", "rope_parameters"):
        params = fixed.get(key)
        if not isinstance(params, Mapping):
            continue
        params = dict(params)
        kind = params.get("rope_type", params.get("type"))
        if kind is not None:
            if kind not in ROPE_TYPES:
                raise ValueError(
                    f"config.json {key} rope_type={kind!r} is not supported "
                    f"(Phi3Config accepts {', '.join(sorted(ROPE_TYPES))})"
                )
            params["rope_type"] = ROPE_TYPES[str(kind)]
            params.pop("type", None)
            if params["rope_type"] == "longrope":  # as Phi3Config: the top-level value wins
                params["original_max_position_embeddings"] = fixed[
                    "original_max_position_embeddings"
                ]
        fixed[key] = params
    return fixed


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Phi-3 ``config.json`` to ModelConfig."""
    refuse(config, REFUSED)
    config = _renamed_rope(config)
    d = llama.dims(config)
    rope_parameters(config)  # raises naming a malformed RoPE entry before any layer is made
    norm = norm_spec(config, "rms", "rms_norm_eps", default=1e-5)
    window = optional(config, "sliding_window", None)
    window = None if window is None else integer(config, "sliding_window")
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads,
            d.kv_heads,
            d.head_dim,
            rope=rope_spec(config, d.head_dim),
            window=window,
        ),
        mlp=llama.swiglu(config, d),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return llama.model_config(config, "phi3", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → Phi3ForCausalLM tensors; the fused ``qkv_proj`` and ``gate_up_proj``
    cut into their row blocks."""
    plan = llama.model_weights(cfg)
    c = cfg.hidden_size
    for i, layer in enumerate(cfg.layers):
        a, f = layer.attention, layer.mlp.intermediate_size
        p, role = f"model.layers.{i}", f"layers.{i}"
        for place, module in llama.LLAMA_NORMS.items():
            plan[f"{role}.{place}.weight"] = plain(f"{p}.{module}.weight", (c,))
        q, kv = a.num_heads * a.head_dim, a.kv_heads * a.head_dim
        total = q + 2 * kv
        qkv = f"{p}.self_attn.qkv_proj.weight"
        for part, (start, stop) in zip("qkv", ((0, q), (q, q + kv), (q + kv, total))):
            plan[f"{role}.{part}.weight"] = sliced_linear(
                qkv, (start, stop), total, c, rows(start, stop), part
            )
        plan[f"{role}.o.weight"] = linear(f"{p}.self_attn.o_proj.weight", c, q)
        gate_up = f"{p}.mlp.gate_up_proj.weight"
        for part, (start, stop) in (("gate", (0, f)), ("up", (f, 2 * f))):
            plan[f"{role}.mlp.{part}_weight"] = sliced_linear(
                gate_up, (start, stop), 2 * f, c, rows(start, stop), part
            )
        plan[f"{role}.mlp.down_weight"] = linear(f"{p}.mlp.down_proj.weight", c, f)
    return plan


ARCHITECTURE = Architecture(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="phi3",
)
