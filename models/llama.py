"""Llama (LlamaForCausalLM) and the families that share its graph: Mistral, Qwen2.

RMSNorm, split-halves RoPE (``rope_theta``, ``rope_scaling`` linear/llama3, partial via
``partial_rotary_factor``), GQA/MQA, SwiGLU, optional q/k/v(/o) biases, ``head_dim`` that may
differ from hidden/heads, tied or untied lm_head. Torch Linear weights ``[out, in]`` are
transposed to ``[in, out]`` at export time.
"""

from collections.abc import Mapping

from graphattn.models.common import optional, require
from graphattn.spec import Architecture, ModelConfig, WeightSource, transpose

_FAMILY_BIASES = {"llama": None, "mistral": (False, False), "qwen2": (True, False)}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Llama/Mistral/Qwen2 ``config.json`` to ModelConfig."""
    model_type = str(optional(config, "model_type", "llama"))
    hidden = int(require(config, "hidden_size"))
    heads = int(require(config, "num_attention_heads"))
    head_dim = int(optional(config, "head_dim", hidden // heads if hidden % heads == 0 else 0))
    if head_dim < 1:
        raise ValueError(f"config hidden_size={hidden} is not a multiple of heads={heads}")
    act = optional(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config hidden_act {act!r} is not supported (only silu)")
    biases = _FAMILY_BIASES.get(model_type)
    if biases is None:
        flag = bool(optional(config, "attention_bias", False))
        biases = (flag, flag)
    window = None
    if model_type == "mistral":
        window = optional(config, "sliding_window", None)
    if model_type == "qwen2" and optional(config, "use_sliding_window", False):
        raise ValueError("config use_sliding_window=true (per-layer windows) is not supported")
    # transformers < 5 writes rope_theta / rope_scaling; 5.x writes one rope_parameters dict.
    rope = dict(optional(config, "rope_parameters", {}))  # type: ignore[arg-type]
    theta = float(rope.get("rope_theta", optional(config, "rope_theta", 10000.0)))
    scaling = optional(config, "rope_scaling", None)
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = rope
    if scaling is not None:
        scaling = dict(scaling)  # type: ignore[arg-type]
        scaling["type"] = scaling.get("type") or scaling.get("rope_type")
    partial = float(
        rope.get("partial_rotary_factor", optional(config, "partial_rotary_factor", 1.0))
    )
    rotary_dim = None if partial == 1.0 else int(head_dim * partial) // 2 * 2
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(require(config, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(config, "num_hidden_layers")),
        num_heads=heads,
        kv_heads=int(optional(config, "num_key_value_heads", heads)),
        head_dim=head_dim,
        intermediate_size=int(require(config, "intermediate_size")),
        context_length=int(optional(config, "max_position_embeddings", 2048)),
        positions="rotary",
        norm="rms",
        norm_epsilon=float(optional(config, "rms_norm_eps", 1e-6)),
        mlp="swiglu",
        qkv_bias=biases[0],
        out_bias=biases[1],
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        rotary_dim=rotary_dim,
        window=None if window is None else int(window),
        bos_token_id=optional(config, "bos_token_id", None),
        eos_token_id=optional(config, "eos_token_id", None),
        pad_token_id=optional(config, "pad_token_id", None),
    )


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (LlamaForCausalLM names)."""
    c, v, f = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim

    def linear(name: str, out_features: int, in_features: int) -> WeightSource:
        return WeightSource(
            name, name, (out_features, in_features), transpose, (in_features, out_features)
        )

    def plain(name: str, shape: tuple[int, ...]) -> WeightSource:
        return WeightSource(name, name, shape)

    plan = {
        "embed_tokens": plain("model.embed_tokens.weight", (v, c)),
        "final_norm.weight": plain("model.norm.weight", (c,)),
    }
    plan["lm_head.weight"] = (
        plan["embed_tokens"] if cfg.tie_word_embeddings else plain("lm_head.weight", (v, c))
    )
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        plan[f"layers.{i}.attn_norm.weight"] = plain(f"{p}.input_layernorm.weight", (c,))
        plan[f"layers.{i}.mlp_norm.weight"] = plain(f"{p}.post_attention_layernorm.weight", (c,))
        for part, width in (("q", q_width), ("k", kv_width), ("v", kv_width)):
            plan[f"layers.{i}.{part}.weight"] = linear(
                f"{p}.self_attn.{part}_proj.weight", width, c
            )
            if cfg.qkv_bias:
                plan[f"layers.{i}.{part}.bias"] = plain(f"{p}.self_attn.{part}_proj.bias", (width,))
        plan[f"layers.{i}.o.weight"] = linear(f"{p}.self_attn.o_proj.weight", c, q_width)
        if cfg.out_bias:
            plan[f"layers.{i}.o.bias"] = plain(f"{p}.self_attn.o_proj.bias", (c,))
        plan[f"layers.{i}.mlp.gate_weight"] = linear(f"{p}.mlp.gate_proj.weight", f, c)
        plan[f"layers.{i}.mlp.up_weight"] = linear(f"{p}.mlp.up_proj.weight", f, c)
        plan[f"layers.{i}.mlp.down_weight"] = linear(f"{p}.mlp.down_proj.weight", c, f)
    return plan


ARCHITECTURE = Architecture(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="llama",
)
