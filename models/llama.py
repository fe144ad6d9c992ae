"""Llama (LlamaForCausalLM) and the families that share its graph: Mistral, Qwen2.

RMSNorm, split-halves RoPE (every scaling type, partial via ``partial_rotary_factor``),
GQA/MQA, SwiGLU, q/k/v(/o) biases where the checkpoint has them, ``head_dim`` that may differ
from hidden/heads, tied or untied lm_head, sliding windows per layer (``layer_types``; Mistral's
``sliding_window`` on every layer), native sparse or sparse routed attention per layer from a
``graphattn`` section (:mod:`graphattn.models.sparse_section`, gate tensors
``model.layers.{i}.self_attn.gate_coarse`` ...). Torch Linear weights ``[out, in]`` are
transposed to ``[in, out]`` at export time.

The pieces here (:func:`dims`, :func:`model_config`, :func:`layer_weights`, ...) are what the
other Llama-shaped families (Qwen3, Gemma, OLMo 2, ...) compose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from graphattn.models.common import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    activation,
    head_dim_of,
    integer,
    layer_types,
    linear,
    norm_spec,
    optional,
    optional_roles,
    plain,
    refuse,
    rope_spec,
    tied_head,
    token_ids,
)
from graphattn.models.sparse_section import gate_weights, with_sparse_layers
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    GGUFSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    NormSpec,
    WeightSource,
)


@dataclass(frozen=True)
class Dims:
    """The sizes every Llama-shaped config states."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    intermediate: int


def dims(config: Mapping[str, object]) -> Dims:
    """Sizes from ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``head_dim``, ``num_hidden_layers``, ``intermediate_size``."""
    hidden = integer(config, "hidden_size")
    heads = integer(config, "num_attention_heads")
    return Dims(
        hidden=hidden,
        heads=heads,
        kv_heads=integer(config, "num_key_value_heads", default=heads),
        head_dim=head_dim_of(config, hidden, heads),
        layers=integer(config, "num_hidden_layers"),
        intermediate=integer(config, "intermediate_size"),
    )


def window_of(config: Mapping[str, object], layer_type: str) -> int | None:
    """The sliding window of a ``sliding_attention`` layer (``sliding_window``), else None."""
    if layer_type != SLIDING:
        return None
    return integer(config, "sliding_window")


def model_config(
    config: Mapping[str, object],
    model_type: str,
    layers: list[LayerSpec],
    final_norm: NormSpec,
    **kw,
) -> ModelConfig:
    """The model-wide part every family shares (vocabulary, context, tied head, token ids)."""
    return ModelConfig(
        model_type=model_type,
        vocab_size=integer(config, "vocab_size"),
        hidden_size=integer(config, "hidden_size"),
        context_length=integer(config, "max_position_embeddings", default=2048),
        layers=tuple(layers),
        final_norm=final_norm,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", kw.pop("tied", False))),
        **token_ids(config),
        **kw,
    )


def swiglu(config: Mapping[str, object], d: Dims, key: str = "hidden_act") -> MlpSpec:
    """A gated MLP with the config's activation (SiLU for Llama)."""
    return MlpSpec("gated", activation(config, key, "silu", ACTIVATIONS), d.intermediate)


LLAMA_REFUSED = {"pretraining_tp": lambda v: v in (None, 1)}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Llama/Mistral/Qwen2 ``config.json`` to ModelConfig."""
    model_type = str(optional(config, "model_type", "llama"))
    refuse(config, LLAMA_REFUSED)
    d = dims(config)
    # Mistral's sliding_window applies to every layer; Qwen2 writes layer_types.
    default_type = SLIDING if model_type == "mistral" and config.get("sliding_window") else FULL
    norm = norm_spec(config, "rms", "rms_norm_eps")
    layers = [
        LayerSpec(
            attention=AttentionSpec(
                d.heads,
                d.kv_heads,
                d.head_dim,
                rope=rope_spec(config, d.head_dim),
                window=window_of(config, kind),
            ),
            mlp=swiglu(config, d),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for kind in layer_types(config, d.layers, default_type)
    ]
    return model_config(config, model_type, with_sparse_layers(config, layers), norm)


# ------------------------------------------------------------------------------ weights
LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def layer_weights(
    plan: dict[str, WeightSource],
    cfg: ModelConfig,
    i: int,
    *,
    prefix: str = "model.layers",
    attention: str = "self_attn",
    norms: Mapping[str, str] = LLAMA_NORMS,
    qk_norms: Mapping[str, str] | None = None,
    norm_fix=None,
    mlp: str = "mlp",
    biases: tuple[str, ...] = ("q", "k", "v", "o"),
) -> None:
    """Layer ``i``'s roles with Llama's names (``{prefix}.{i}.self_attn.q_proj.weight`` ...):
    the norms in ``norms`` (place → module name, with ``norm_fix`` such as ``plus_one``),
    ``qk_norms`` (``{"q_norm": "q_norm", ...}`` when the layer has them), q/k/v/o biases in
    ``biases`` where the checkpoint has them (optional roles)."""
    layer = cfg.layers[i]
    a, c = layer.attention, cfg.hidden_size
    p, role = f"{prefix}.{i}", f"layers.{i}"
    widths = {"q": a.num_heads * a.head_dim, "k": a.kv_heads * a.head_dim}
    widths["v"] = widths["k"]
    for place, module in norms.items():
        if place in layer.norms:
            plan[f"{role}.{place}.weight"] = plain(f"{p}.{module}.weight", (c,), norm_fix)
    for place, module in (qk_norms or {}).items():
        width = a.head_dim if a.qk_norm_scope == "head" else widths[place[0]]
        plan[f"{role}.{place}.weight"] = plain(
            f"{p}.{attention}.{module}.weight", (width,), norm_fix
        )
    for part, width in widths.items():
        plan[f"{role}.{part}.weight"] = linear(f"{p}.{attention}.{part}_proj.weight", width, c)
    plan[f"{role}.o.weight"] = linear(f"{p}.{attention}.o_proj.weight", c, widths["q"])
    bias_widths = {**widths, "o": c}
    optional_roles(
        plan,
        (
            (
                f"{role}.{part}.bias",
                plain(f"{p}.{attention}.{part}_proj.bias", (bias_widths[part],)),
            )
            for part in biases
        ),
    )
    f = layer.mlp.intermediate_size
    m = f"{p}.{mlp}"
    plan[f"{role}.mlp.gate_weight"] = linear(f"{m}.gate_proj.weight", f, c)
    plan[f"{role}.mlp.up_weight"] = linear(f"{m}.up_proj.weight", f, c)
    plan[f"{role}.mlp.down_weight"] = linear(f"{m}.down_proj.weight", c, f)
    optional_roles(
        plan,
        (
            (f"{role}.mlp.{part}_bias", plain(f"{m}.{part}_proj.bias", (width,)))
            for part, width in (("gate", f), ("up", f), ("down", c))
        ),
    )


def model_weights(cfg: ModelConfig, *, final_norm: str = "model.norm", norm_fix=None) -> dict:
    """Embeddings, final norm and output projection with Llama's names."""
    c, v = cfg.hidden_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain("model.embed_tokens.weight", (v, c)),
        "final_norm.weight": plain(f"{final_norm}.weight", (c,), norm_fix),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    return plan


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → checkpoint tensors (LlamaForCausalLM names)."""
    plan = model_weights(cfg)
    for i in range(cfg.num_layers):
        layer_weights(plan, cfg, i)
        gate_weights(plan, cfg, i)
    return plan


# --------------------------------------------------------------------------------- GGUF
LLAMA_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp's converter permutes Llama's q/k rows for its interleaved RoPE; its Qwen2 and
# Qwen3 converters (TextModel's plain name mapping) store them as HF does.
LLAMA_PERMUTED = {
    "self_attn.q_proj.weight": "num_attention_heads",
    "self_attn.q_proj.bias": "num_attention_heads",
    "self_attn.k_proj.weight": "num_key_value_heads",
    "self_attn.k_proj.bias": "num_key_value_heads",
}
# ``{arch}.*`` metadata that changes llama.cpp's math for these families and is not read
# here: a file stating one is refused by name (never silently ignored).
GGUF_REFUSED = (
    "attention.scale",
    "attention.clamp_kqv",
    "attention.max_alibi_bias",
    "attention.sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "logit_scale",
    "embedding_scale",
    "residual_scale",
    "expert_count",
    "rope.scaling.attn_factor",
    "rope.scaling.yarn_log_multiplier",
    "rope.scaling.yarn_ext_factor",
    "rope.scaling.yarn_attn_factor",
)


def refuse_gguf_keys(fields: Mapping[str, object], arch: str, keys=GGUF_REFUSED) -> None:
    """ValueError naming the first ``{arch}.<key>`` of ``keys`` the file states."""
    for key in keys:
        name = f"{arch}.{key}"
        if name in fields:
            raise ValueError(f"GGUF metadata {name}={fields[name]!r} is not supported")


def gguf_rope_scaling(fields: Mapping[str, object], arch: str, need) -> dict | None:
    """``rope_scaling`` from ``{arch}.rope.scaling.*`` (linear, YaRN) or the older
    ``{arch}.rope.scale_linear``; None without scaling."""
    kind = fields.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        old = fields.get(f"{arch}.rope.scale_linear")
        if old is None or float(old) == 1.0:
            return None
        return {"rope_type": "linear", "factor": float(old)}
    factor = float(need(f"{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported")
    # llama.cpp's YaRN: correction range from the original context and beta_fast/beta_slow,
    # cos/sin scaled by 1 + 0.1 ln(factor): transformers' yarn with these parameters.
    scaling = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(
            need(f"{arch}.rope.scaling.original_context_length")
        ),
    }
    for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = fields.get(f"{arch}.rope.scaling.{key}")
        if value is not None:
            scaling[hf] = float(value)
    return scaling


def gguf_common_config(fields: Mapping[str, object], arch: str, need) -> dict:
    """The config keys every Llama-shaped GGUF states under ``{arch}.*``; ``need(key)``
    reads a required key (raising the reader's one-line error when absent)."""
    heads = int(need(f"{arch}.attention.head_count"))
    hidden = int(need(f"{arch}.embedding_length"))
    if heads < 1 or hidden < 1:
        raise ValueError(
            f"GGUF metadata {arch}.attention.head_count={heads} / {arch}.embedding_length="
            f"{hidden} must be positive"
        )
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = fields.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        need(f"{arch}.vocab_size")
    config = {
        "hidden_size": hidden,
        "intermediate_size": int(need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(need(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(fields.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(fields.get(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(fields.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(fields.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": fields.get("tokenizer.ggml.padding_token_id"),
    }
    value_length = fields.get(f"{arch}.attention.value_length")
    if value_length is not None and int(value_length) != config["head_dim"]:
        raise ValueError(
            f"GGUF metadata {arch}.attention.value_length={value_length} (key_length"
            f" {config['head_dim']}) is not supported"
        )
    rotary = fields.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != config["head_dim"]:
        config["partial_rotary_factor"] = int(rotary) / config["head_dim"]
    scaling = gguf_rope_scaling(fields, arch, need)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF LlamaForCausalLM ``config.json`` from ``llama.*`` GGUF metadata."""
    refuse_gguf_keys(fields, "llama")
    config = gguf_common_config(fields, "llama", need)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        **config,
    }


def qwen2_gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF Qwen2ForCausalLM ``config.json`` from ``qwen2.*`` GGUF metadata (every layer
    full attention, as llama.cpp runs Qwen2)."""
    refuse_gguf_keys(fields, "qwen2")
    config = gguf_common_config(fields, "qwen2", need)
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        **config,
    }


GGUF = GGUFSpec(
    arch="llama",
    config=gguf_config,
    tensor_names=LLAMA_GGUF_NAMES,
    layer_names=LLAMA_GGUF_LAYER_NAMES,
    permuted_rows=LLAMA_PERMUTED,
)
# Qwen2: Llama's names (q/k/v biases included), rows as HF stores them.
QWEN2_GGUF = GGUFSpec(
    arch="qwen2",
    config=qwen2_gguf_config,
    tensor_names=LLAMA_GGUF_NAMES,
    layer_names=LLAMA_GGUF_LAYER_NAMES,
)

ARCHITECTURE = Architecture(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="llama",
    gguf=GGUF,
)
# The same graph registered for model_type qwen2, reading qwen2 GGUF files.
QWEN2 = replace(ARCHITECTURE, gguf=QWEN2_GGUF)
