"""Helium (HeliumForCausalLM, Kyutai): the Llama graph with interleaved RoPE.

transformers' ``apply_rotary_pos_emb`` for Helium rotates channel pairs ``(2i, 2i + 1)`` with
frequency ``i`` (GPT-J layout), over the whole head. q/k/v biases where the checkpoint has
them (``attention_bias``; ``o_proj`` never has one), MLP biases (``mlp_bias``), ``head_dim``
(default 128) with ``o_proj`` mapping ``hidden_size`` to ``hidden_size`` (so heads × head_dim
must equal hidden_size), ``rms_norm_eps`` (default 1e-8), GQA, untied head by default. Every
layer attends causally over the whole past (HeliumModel has no sliding windows: it builds
only the causal mask, so ``sliding_window`` / ``layer_types`` keys, if a file has them, do
not change its math).
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import norm_spec, refuse, rope_spec
from graphattn.models.ministral import refuse_partial_rotary, with_default_theta
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig

DEFAULT_THETA = 100_000.0  # HeliumConfig.default_theta
DEFAULT_HEAD_DIM = 128  # HeliumConfig.head_dim
DEFAULT_EPS = 1e-8  # HeliumConfig.rms_norm_eps


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Helium ``config.json`` to ModelConfig."""
    refuse(config, llama.LLAMA_REFUSED)
    refuse_partial_rotary(config)
    config = with_default_theta(config, DEFAULT_THETA)
    if config.get("head_dim") is None:
        config = {**config, "head_dim": DEFAULT_HEAD_DIM}
    d = llama.dims(config)
    if d.heads * d.head_dim != d.hidden:
        raise ValueError(
            f"config.json num_attention_heads={d.heads} x head_dim={d.head_dim} must equal "
            f"hidden_size={d.hidden} (Helium's o_proj maps hidden_size to hidden_size)"
        )
    norm = norm_spec(config, "rms", "rms_norm_eps", default=DEFAULT_EPS)
    layers = [
        LayerSpec(
            attention=AttentionSpec(
                d.heads,
                d.kv_heads,
                d.head_dim,
                rope=rope_spec(config, d.head_dim, interleaved=True),
            ),
            mlp=llama.swiglu(config, d),
            norms={"attn_norm": norm, "mlp_norm": norm},
        )
        for _ in range(d.layers)
    ]
    return llama.model_config(config, "helium", layers, norm)


ARCHITECTURE = Architecture(
    name="helium",
    hf_architectures=("HeliumForCausalLM",),
    config_from_hf=config_from_hf,
    weights=llama.weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="llama",
)
