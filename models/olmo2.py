"""OLMo 2 (Olmo2ForCausalLM): RMS QK-norm over the full projection width, norms only after
attention and after the MLP.

``q_norm`` ``[heads·head_dim]`` and ``k_norm`` ``[kv_heads·head_dim]`` normalize the whole
projection before it is split into heads (then RoPE). Each layer is
``h += post_attention_layernorm(attn(h))`` then ``h += post_feedforward_layernorm(mlp(h))``
with no norm before either; the final norm is ``model.norm``. Split-halves RoPE over the whole
head (every scaling type), GQA, SwiGLU, q/k/v/o biases where the checkpoint has them.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import norm_spec, rope_spec
from graphattn.models.olmo import whole_head_rope
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig

QK_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm"}
NORMS = {
    "post_attn_norm": "post_attention_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map an OLMo 2 ``config.json`` to ModelConfig."""
    whole_head_rope(config)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps", default=1e-5)
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads,
            d.kv_heads,
            d.head_dim,
            rope=rope_spec(config, d.head_dim, partial=1.0),
            qk_norm=norm,
            qk_norm_scope="full",
        ),
        mlp=llama.swiglu(config, d),
        norms={"post_attn_norm": norm, "post_mlp_norm": norm},
    )
    return llama.model_config(config, "olmo2", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict:
    """Llama's names, post-norms and full-width ``self_attn.q_norm`` / ``k_norm``."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, norms=NORMS, qk_norms=QK_NORMS)
    return plan


ARCHITECTURE = Architecture(
    name="olmo2",
    hf_architectures=("Olmo2ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
)
