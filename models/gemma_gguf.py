"""GGUF files of Gemma (``gemma``), Gemma 2 (``gemma2``) and Gemma 3 text (``gemma3``), as
llama.cpp's ``convert_hf_to_gguf.py`` writes them and llama.cpp runs them.

- Norm weights: the converter stores every Gemma norm (the QK-norms of Gemma 3 too) as the
  scale ``1 + w``. The config made from such a file carries :data:`NORMS_ARE_SCALES`, and
  the weight plan then reads those norms as they are instead of adding one again.
- Names: Llama's, plus Gemma 2/3's ``post_attention_norm`` / ``ffn_norm`` (the
  pre-feed-forward norm) / ``post_ffw_norm`` and Gemma 3's ``attn_q_norm`` / ``attn_k_norm``;
  no q/k permutation (the Gemma converters map names only); the head is tied unless the file
  has ``output.weight``.
- Metadata: the Llama-shaped keys, ``attention.sliding_window`` and the softcaps. The
  attention scale, which these files do not state, follows llama.cpp:
  ``(hidden / heads) ** -0.5`` for the 27B layouts (Gemma 2: 46 blocks, Gemma 3: 62 blocks),
  ``key_length ** -0.5`` otherwise. Sliding layers follow llama.cpp's patterns: every other
  layer from the first (Gemma 2), five of six (Gemma 3, when ``sliding_window`` is set; none
  otherwise), Gemma 3's local layers with base ``rope.freq_base_swa`` (default 10000) and
  no scaling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from graphattn.models import gemma, gemma3, llama
from graphattn.models.common import FULL, SLIDING
from graphattn.spec import Architecture, GGUFSpec, ModelConfig, WeightSource, plus_one

# config.json key of a config made from a GGUF file: its norm weights are the scales 1 + w.
NORMS_ARE_SCALES = "graphattn_gguf_norms_are_scales"

GEMMA_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GEMMA2_LAYER_NAMES = {
    **GEMMA_LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GEMMA3_LAYER_NAMES = {
    **GEMMA2_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Keys read here, not refused: the window and the softcaps.
READ = ("attention.sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
REFUSED = tuple(k for k in llama.GGUF_REFUSED if k not in READ)
# llama.cpp's 27B layouts (by block count) scale scores by (hidden / heads) ** -0.5.
WIDE_SCALE_BLOCKS = {"gemma2": 46, "gemma3": 62}


def common(fields: Mapping[str, object], arch: str, need) -> dict:
    """The Llama-shaped keys, the attention scale llama.cpp uses, the marker."""
    config = llama.gguf_common_config(fields, arch, need)
    if arch in WIDE_SCALE_BLOCKS:
        wide = config["num_hidden_layers"] == WIDE_SCALE_BLOCKS[arch]
        heads = config["num_attention_heads"]
        scalar = config["hidden_size"] // heads if wide else config["head_dim"]
        config["query_pre_attn_scalar"] = scalar
    config[NORMS_ARE_SCALES] = True
    return config


def gemma_gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF GemmaForCausalLM ``config.json`` from ``gemma.*`` metadata."""
    llama.refuse_gguf_keys(fields, "gemma")
    return {
        "model_type": "gemma",
        "architectures": ["GemmaForCausalLM"],
        "hidden_act": "gelu_pytorch_tanh",
        **common(fields, "gemma", need),
    }


def gemma2_gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF Gemma2ForCausalLM ``config.json`` from ``gemma2.*`` metadata."""
    llama.refuse_gguf_keys(fields, "gemma2", REFUSED)
    config = common(fields, "gemma2", need)
    count = config["num_hidden_layers"]
    return {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        **config,
        "sliding_window": int(fields.get("gemma2.attention.sliding_window", 4096)),
        "layer_types": [SLIDING if i % 2 == 0 else FULL for i in range(count)],
        "attn_logit_softcapping": float(fields.get("gemma2.attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(fields.get("gemma2.final_logit_softcapping", 30.0)),
    }


def gemma3_gguf_config(fields: Mapping[str, object], need) -> dict:
    """An HF Gemma3ForCausalLM (``gemma3_text``) ``config.json`` from ``gemma3.*`` metadata."""
    llama.refuse_gguf_keys(fields, "gemma3", REFUSED + ("attn_logit_softcapping",))
    config = common(fields, "gemma3", need)
    count = config["num_hidden_layers"]
    window = int(fields.get("gemma3.attention.sliding_window", 0))
    pattern = fields.get("gemma3.attention.sliding_window_pattern", 6)
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise ValueError(
            f"GGUF metadata gemma3.attention.sliding_window_pattern={pattern!r} is not supported"
        )
    slides = [window > 0 and (i + 1) % pattern != 0 for i in range(count)]
    final = fields.get("gemma3.final_logit_softcapping")
    config.update(
        {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_local_base_freq": float(fields.get("gemma3.rope.freq_base_swa", 10000.0)),
            "sliding_window": window or None,
            "layer_types": [SLIDING if s else FULL for s in slides],
            "final_logit_softcapping": None if final is None else float(final),
        }
    )
    return config


def _spec(arch: str, config, layer_names: Mapping[str, str]) -> GGUFSpec:
    return GGUFSpec(
        arch=arch,
        config=config,
        tensor_names=llama.LLAMA_GGUF_NAMES,
        layer_names=layer_names,
    )


def _reading_scales(base: Architecture, spec: GGUFSpec) -> Architecture:
    """``base`` reading ``spec``'s files: a config with :data:`NORMS_ARE_SCALES` gets a weight
    plan whose ``1 + w`` norms are read as they are."""

    def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
        cfg = base.config_from_hf(config)
        if config.get(NORMS_ARE_SCALES):
            cfg = replace(cfg, extra={**cfg.extra, NORMS_ARE_SCALES: True})
        return cfg

    def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
        plan = base.weights(cfg)
        if not cfg.extra.get(NORMS_ARE_SCALES):
            return plan
        return {role: _without_plus_one(source) for role, source in plan.items()}

    return replace(base, config_from_hf=config_from_hf, weights=weights, gguf=spec)


def _without_plus_one(source: WeightSource) -> WeightSource:
    fix: Callable | None = source.transform
    return replace(source, transform=None) if fix is plus_one else source


GEMMA_GGUF = _spec("gemma", gemma_gguf_config, GEMMA_LAYER_NAMES)
GEMMA2_GGUF = _spec("gemma2", gemma2_gguf_config, GEMMA2_LAYER_NAMES)
GEMMA3_GGUF = _spec("gemma3", gemma3_gguf_config, GEMMA3_LAYER_NAMES)

ARCHITECTURE = _reading_scales(gemma.ARCHITECTURE, GEMMA_GGUF)
GEMMA2_ARCHITECTURE = _reading_scales(gemma.GEMMA2_ARCHITECTURE, GEMMA2_GGUF)
GEMMA3_ARCHITECTURE = _reading_scales(gemma3.ARCHITECTURE, GEMMA3_GGUF)
