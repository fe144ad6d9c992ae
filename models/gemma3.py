"""Gemma 3: the text decoder of Gemma3ForCausalLM (``gemma3_text``) and of
Gemma3ForConditionalGeneration (``gemma3``, whose ``config.json`` nests it in ``text_config``).

Gemma 2's layer (``1 + w`` sandwich norms, GeGLU, ``sqrt(hidden)`` embedding scale,
``query_pre_attn_scalar``, sliding/global layers) plus an RMS QK-norm per head with ``1 + w``
weights before RoPE, and one RoPE per layer type: ``rope_parameters.sliding_attention``
(local base, ``rope_local_base_freq`` in older files) and ``rope_parameters.full_attention``
(global base ``rope_theta``, with the file's ``rope_scaling``, e.g. linear factor 8). Without
``layer_types``, layer i slides unless ``(i + 1) % sliding_window_pattern == 0`` (default 6).

The ``gemma3`` export is the text decoder only: its weights are read under
``language_model.model.*`` (``language_model.lm_head.weight`` when untied), as transformers
saves them; the vision tower and the multimodal projector are left out by prefix
(image tokens are not supported: the graph embeds token ids only).

Refused by name: ``use_bidirectional_attention``, ``partial_rotary_factor`` other than 1,
``attn_logit_softcapping`` (transformers' Gemma 3 attention never applies it), and for
``gemma3`` ``text_config.final_logit_softcapping`` (Gemma3ForConditionalGeneration never
applies it; Gemma3ForCausalLM does, and so does its export).
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import gemma, llama
from graphattn.models.common import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    integer,
    norm_spec,
    plain,
    refuse,
    rope_spec,
    tied_head,
)
from graphattn.spec import (
    Architecture,
    LayerSpec,
    ModelConfig,
    RopeSpec,
    WeightSource,
    plus_one,
)

QK_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm"}
DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}  # Gemma3TextConfig.default_theta
GEMMA3_REFUSED = {
    **gemma.GEMMA_REFUSED,
    # stored by Gemma3Attention but never passed to the attention function
    "attn_logit_softcapping": lambda v: v is None,
}
TEXT_PREFIX = "language_model.model"  # Gemma3ForConditionalGeneration as transformers saves it


def rope_parameters(text: Mapping[str, object]) -> dict[str, dict]:
    """``{layer type: RoPE dict}`` as Gemma3TextConfig builds it: ``rope_parameters`` per layer
    type, ``rope_scaling`` merged into the full-attention entry, bases from ``rope_theta``
    (global) and ``rope_local_base_freq`` (local) where the entries state none."""
    params = text.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping) or set(params) - {FULL, SLIDING}:
            raise ValueError(
                f"config.json rope_parameters={params!r} is not supported"
                " (Gemma 3 writes one entry per layer type)"
            )
    params = params or {}
    out = {kind: dict(params.get(kind) or {"rope_type": "default"}) for kind in (FULL, SLIDING)}
    scaling = text.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, Mapping) or ("type" in scaling and "rope_type" not in scaling):
            # merged into {"rope_type": "default"}, a legacy "type" would not count there
            raise ValueError(f"config.json rope_scaling={scaling!r} is not supported")
        out[FULL].update(scaling)
    bases = {FULL: text.get("rope_theta"), SLIDING: text.get("rope_local_base_freq")}
    for kind, entry in out.items():
        if entry.get("rope_theta") is None:
            entry["rope_theta"] = DEFAULT_THETA[kind] if bases[kind] is None else bases[kind]
    return out


def rope_of(text: Mapping[str, object], head_dim: int, kind: str) -> RopeSpec:
    """The RoPE of a ``kind`` layer (one RoPE dict read like a flat ``rope_parameters``)."""
    entry = rope_parameters(text)[kind]
    # per-layer-type entries take their original context from the entry (else
    # max_position_embeddings), never from a top-level original_max_position_embeddings
    flat = {
        "rope_parameters": entry,
        "max_position_embeddings": text.get("max_position_embeddings", 131_072),
    }
    return rope_spec(flat, head_dim)


def text_config_from_hf(
    text: Mapping[str, object], model_type: str, top: Mapping[str, object] | None = None
) -> ModelConfig:
    """The Gemma 3 text decoder from a ``gemma3_text`` config (``top``: the ``gemma3``
    config.json holding it, whose tied-head flag and token ids win)."""
    refuse(text, GEMMA3_REFUSED)
    gemma.refuse_partial_rotary(text)
    d = gemma.gemma_dims(text)
    norm = norm_spec(text, "rms", "rms_norm_eps")
    mlp = gemma.gelu_mlp(text, d, "hidden_activation", ACTIVATIONS)
    pattern = integer(text, "sliding_window_pattern", default=6)
    if pattern < 1:
        raise ValueError(f"config.json sliding_window_pattern={pattern} is not supported")
    ropes = {kind: rope_of(text, d.head_dim, kind) for kind in (FULL, SLIDING)}
    layers = [
        LayerSpec(
            attention=gemma.gemma2_attention(text, d, kind, rope=ropes[kind], qk_norm=norm),
            mlp=mlp,
            norms=dict.fromkeys(gemma.SANDWICH_NORMS, norm),
        )
        for kind in gemma.alternating_types(text, d.layers, pattern)
    ]
    kw = {}
    if top is None:
        kw["final_softcap"] = gemma.softcap(text, "final_logit_softcapping", None)
    else:
        merged = dict(text)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if top.get(key) is not None:
                merged[key] = top[key]
        # the model ties by Gemma3Config's flag (default true), not by text_config's
        merged["tie_word_embeddings"] = bool(top.get("tie_word_embeddings", True))
        text = merged
    return gemma.gemma_model(text, model_type, layers, norm, **kw)


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Gemma 3 text ``config.json`` (``gemma3_text``) to ModelConfig."""
    return text_config_from_hf(config, "gemma3_text")


def conditional_config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Gemma3ForConditionalGeneration ``config.json`` to its text decoder."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        raise ValueError("config.json is missing 'text_config'")
    if text.get("final_logit_softcapping") is not None:
        raise ValueError(
            "config.json text_config.final_logit_softcapping="
            f"{text['final_logit_softcapping']!r} is not supported"
            " (Gemma3ForConditionalGeneration does not apply it)"
        )
    try:
        return text_config_from_hf(text, "gemma3", top=config)
    except ValueError as error:  # name the nested key
        raise ValueError(
            str(error).replace("config.json ", "config.json text_config.", 1)
        ) from None


def layer_plan(cfg: ModelConfig, prefix: str) -> dict[str, WeightSource]:
    """The layers' roles under ``prefix`` (``model.layers`` / ``language_model.model.layers``)."""
    plan: dict[str, WeightSource] = {}
    for i in range(cfg.num_layers):
        llama.layer_weights(
            plan,
            cfg,
            i,
            prefix=prefix,
            norms=gemma.SANDWICH_NORMS,
            qk_norms=QK_NORMS,
            norm_fix=plus_one,
        )
    return plan


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Gemma3ForCausalLM: Llama's names, sandwich norms, q/k norms; norms read as ``1 + w``."""
    return {**llama.model_weights(cfg, norm_fix=plus_one), **layer_plan(cfg, "model.layers")}


def conditional_weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Gemma3ForConditionalGeneration: the same roles under ``language_model.model``."""
    c, v = cfg.hidden_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain(f"{TEXT_PREFIX}.embed_tokens.weight", (v, c)),
        "final_norm.weight": plain(f"{TEXT_PREFIX}.norm.weight", (c,), plus_one),
    }
    tied_head(plan, cfg.tie_word_embeddings, "language_model.lm_head.weight", (v, c))
    plan.update(layer_plan(cfg, f"{TEXT_PREFIX}.layers"))
    return plan


# The vision tower (SigLIP) and the projector: not part of the text decoder's graph, left out
# by prefix (``vision_tower.*`` as transformers 5 saves it, ``vision_tower.vision_model.*`` as
# the Hub files have it).
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")

ARCHITECTURE = Architecture(
    name="gemma3_text",
    hf_architectures=("Gemma3ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=gemma.IGNORED,
    genai_type="gemma3_text",
)

CONDITIONAL_ARCHITECTURE = Architecture(
    name="gemma3",
    hf_architectures=("Gemma3ForConditionalGeneration",),
    config_from_hf=conditional_config_from_hf,
    weights=conditional_weights,
    ignored=gemma.IGNORED,
    ignored_prefixes=VISION_PREFIXES,
    genai_type="gemma3_text",  # the export is the text decoder (GenAI's "gemma3" has vision)
)
