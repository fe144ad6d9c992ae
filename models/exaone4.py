"""EXAONE 4 (Exaone4ForCausalLM): RMS QK-norm per head, norms only after attention and after
the MLP, sliding local layers with RoPE and global layers without it.

Layer types come from ``layer_types`` or, as ``Exaone4Config`` derives them, from an integer
``sliding_window_pattern`` P (layer i is global when ``(i + 1) % P == 0``). As in HF's
``Exaone4Attention``, RoPE is applied only on ``sliding_attention`` layers when the model has
a ``sliding_window``; the global layers are NoPE (``AttentionSpec.rope=None``). Without a
``sliding_window`` every layer is global and rotates. Split-halves RoPE over the whole head
(every scaling type: EXAONE 4 ships ``llama3``), GQA, SwiGLU, ``head_dim`` that may differ from
hidden/heads.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import FULL, SLIDING, integer, layer_types, norm_spec, rope_spec
from graphattn.models.olmo import whole_head_rope
from graphattn.spec import Architecture, AttentionSpec, LayerSpec, ModelConfig

QK_NORMS = {"q_norm": "q_norm", "k_norm": "k_norm"}
NORMS = {
    "post_attn_norm": "post_attention_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}
DEFAULT_WINDOW = 4096  # Exaone4Config.sliding_window
DEFAULT_PATTERN = 4  # Exaone4Config.sliding_window_pattern


def window_of(config: Mapping[str, object]) -> int | None:
    """``sliding_window`` (HF's default 4096 when absent; an explicit null is none)."""
    if "sliding_window" in config and config["sliding_window"] is None:
        return None
    return integer(config, "sliding_window", default=DEFAULT_WINDOW)


def exaone_layer_types(config: Mapping[str, object], count: int, window: int | None) -> list:
    """``layer_types``, else derived from an integer ``sliding_window_pattern``."""
    if config.get("layer_types") is not None:
        types = layer_types(config, count)
    else:
        pattern = config.get("sliding_window_pattern", DEFAULT_PATTERN)
        if window is None or isinstance(pattern, bool) or not isinstance(pattern, int):
            raise ValueError(
                f"config.json sliding_window_pattern={pattern!r} without layer_types is not"
                " supported (an integer pattern with a sliding_window is)"
            )
        if pattern < 1:
            raise ValueError(f"config.json sliding_window_pattern={pattern!r} is not supported")
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(count)]
    if window is None and SLIDING in types:
        raise ValueError(
            "config.json sliding_window=null is not supported with sliding_attention layers"
        )
    return types


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map an EXAONE 4 ``config.json`` to ModelConfig."""
    whole_head_rope(config)
    d = llama.dims(config)
    norm = norm_spec(config, "rms", "rms_norm_eps", default=1e-5)
    window = window_of(config)
    layers = []
    for kind in exaone_layer_types(config, d.layers, window):
        sliding = kind == SLIDING
        rotates = window is None or sliding  # HF: global layers of a windowed model are NoPE
        layers.append(
            LayerSpec(
                attention=AttentionSpec(
                    d.heads,
                    d.kv_heads,
                    d.head_dim,
                    rope=rope_spec(config, d.head_dim, partial=1.0) if rotates else None,
                    window=window if sliding else None,
                    qk_norm=norm,
                ),
                mlp=llama.swiglu(config, d),
                norms={"post_attn_norm": norm, "post_mlp_norm": norm},
            )
        )
    return llama.model_config(config, "exaone4", layers, norm)


def weights(cfg: ModelConfig) -> dict:
    """Llama's names (no projection biases), post-norms and per-head ``q_norm`` / ``k_norm``."""
    plan = llama.model_weights(cfg)
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, norms=NORMS, qk_norms=QK_NORMS, biases=())
    return plan


ARCHITECTURE = Architecture(
    name="exaone4",
    hf_architectures=("Exaone4ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
)
