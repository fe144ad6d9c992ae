"""Architectures as data: one small file per family, registered by HF ``model_type``.

Adding a family whose features already exist as ops is one file plus one line here.
"""

from collections.abc import Mapping

from graphattn.models import (
    bloom,
    codegen,
    cohere,
    deepseek,
    exaone4,
    falcon,
    gemma3,
    gemma_gguf,
    glm,
    gpt2,
    gpt_bigcode,
    gpt_neo,
    gpt_neox,
    gpt_oss,
    gptj,
    granite,
    helium,
    llama,
    ministral,
    mixtral,
    mpt,
    nemotron,
    olmo,
    olmo2,
    phi,
    phi3_gguf,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    smollm3,
    stablelm,
    starcoder2,
)
from graphattn.models.sparse_section import refuse_unread
from graphattn.spec import Architecture, GGUFSpec

REGISTRY: dict[str, Architecture] = {
    "bloom": bloom.ARCHITECTURE,
    "codegen": codegen.ARCHITECTURE,
    "cohere": cohere.ARCHITECTURE,
    "deepseek_v2": deepseek.V2_ARCHITECTURE,
    "deepseek_v3": deepseek.V3_ARCHITECTURE,
    "exaone4": exaone4.ARCHITECTURE,
    "falcon": falcon.ARCHITECTURE,
    "gemma": gemma_gguf.ARCHITECTURE,  # reads gemma GGUF files
    "gemma2": gemma_gguf.GEMMA2_ARCHITECTURE,
    "gemma3": gemma3.CONDITIONAL_ARCHITECTURE,  # its text decoder only
    "gemma3_text": gemma_gguf.GEMMA3_ARCHITECTURE,
    "glm": glm.ARCHITECTURE,
    "gpt2": gpt2.ARCHITECTURE,
    "gpt_bigcode": gpt_bigcode.ARCHITECTURE,
    "gpt_neo": gpt_neo.ARCHITECTURE,
    "gpt_neox": gpt_neox.ARCHITECTURE,
    "gpt_oss": gpt_oss.ARCHITECTURE,
    "gptj": gptj.ARCHITECTURE,
    "granite": granite.ARCHITECTURE,
    "helium": helium.ARCHITECTURE,
    "llama": llama.ARCHITECTURE,
    "ministral": ministral.ARCHITECTURE,
    "mistral": llama.ARCHITECTURE,  # Llama graph plus sliding_window
    "mixtral": mixtral.ARCHITECTURE,
    "mpt": mpt.ARCHITECTURE,
    "nemotron": nemotron.ARCHITECTURE,
    "olmo": olmo.ARCHITECTURE,
    "olmo2": olmo2.ARCHITECTURE,
    "phi": phi.ARCHITECTURE,
    "phi3": phi3_gguf.ARCHITECTURE,  # reads phi3 GGUF files
    "qwen2": llama.QWEN2,  # Llama graph plus q/k/v biases; reads qwen2 GGUF files
    "qwen2_moe": qwen2_moe.ARCHITECTURE,
    "qwen3": qwen3.ARCHITECTURE,
    "qwen3_moe": qwen3_moe.ARCHITECTURE,
    "smollm3": smollm3.ARCHITECTURE,
    "stablelm": stablelm.ARCHITECTURE,
    "starcoder2": starcoder2.ARCHITECTURE,
}


def architecture_for(config: Mapping[str, object]) -> Architecture:
    """The registered architecture for an HF ``config.json``; ValueError naming what is unknown."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"config.json model_type {model_type!r} is not supported (known: {known})")
    architecture = REGISTRY[str(model_type)]
    declared = config.get("architectures") or []
    if not isinstance(declared, list) or not all(isinstance(a, str) for a in declared):
        raise ValueError(f"config.json architectures must be a list of names, got {declared!r}")
    unknown = [a for a in declared if a not in architecture.hf_architectures]
    if unknown:
        raise ValueError(
            f"config.json architectures {unknown} are not supported for model_type {model_type!r}"
            f" (supported: {', '.join(architecture.hf_architectures)})"
        )
    refuse_unread(config, architecture.name)  # a graphattn section only Llama-likes read
    return architecture


def gguf_spec_for(arch: object) -> GGUFSpec:
    """The GGUF reading of the family whose ``general.architecture`` is ``arch``."""
    specs = {a.gguf.arch: a.gguf for a in REGISTRY.values() if a.gguf is not None}
    if arch not in specs:
        known = ", ".join(sorted(specs))
        raise ValueError(f"GGUF architecture {arch!r} is not supported (known: {known})")
    return specs[str(arch)]
