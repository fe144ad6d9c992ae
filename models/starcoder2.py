"""StarCoder2 (Starcoder2ForCausalLM): LayerNorm with bias, biased projections, a plain GELU
MLP, one sliding window on every layer.

``input_layernorm`` / ``post_attention_layernorm`` / ``model.norm`` are LayerNorms with weight
and bias (``norm_epsilon``). ``use_bias`` gives q/k/v/o and ``mlp.c_fc`` / ``mlp.c_proj``
biases. The MLP is ``c_proj(act(c_fc(x)))`` (``gelu_pytorch_tanh``). ``sliding_window``, when
set, applies to every layer. Split-halves RoPE over the whole head (every scaling type), GQA,
``head_dim`` that may differ from hidden/heads, tied embeddings by default.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    integer,
    linear,
    number,
    plain,
    rope_spec,
)
from graphattn.models.olmo import whole_head_rope
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    NormSpec,
)


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a StarCoder2 ``config.json`` to ModelConfig."""
    whole_head_rope(config)
    d = llama.dims(config)
    norm = NormSpec("layer", number(config, "norm_epsilon", 1e-5))
    window = None if config.get("sliding_window") is None else integer(config, "sliding_window")
    act = activation(config, "hidden_act", "gelu_pytorch_tanh", ACTIVATIONS)
    layer = LayerSpec(
        attention=AttentionSpec(
            d.heads,
            d.kv_heads,
            d.head_dim,
            rope=rope_spec(config, d.head_dim, partial=1.0),
            window=window,
        ),
        mlp=MlpSpec("plain", act, d.intermediate),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    use_bias = config.get("use_bias", True)
    if not isinstance(use_bias, bool):
        raise ValueError(f"config.json use_bias must be true or false, got {use_bias!r}")
    return llama.model_config(
        config, "starcoder2", [layer] * d.layers, norm, tied=True, extra={"use_bias": use_bias}
    )


def weights(cfg: ModelConfig) -> dict:
    """Starcoder2ForCausalLM names: Llama's attention, LayerNorm biases, ``mlp.c_fc`` /
    ``mlp.c_proj``; every projection bias exactly when ``use_bias``."""
    c, f = cfg.hidden_size, cfg.intermediate_size
    use_bias = bool(cfg.extra.get("use_bias", True))
    plan = llama.model_weights(cfg)
    plan["final_norm.bias"] = plain("model.norm.bias", (c,))
    for i in range(cfg.num_layers):
        llama.layer_weights(plan, cfg, i, biases=())
        for role in [r for r in plan if r.startswith(f"layers.{i}.mlp.")]:
            del plan[role]  # Llama's gated MLP roles: StarCoder2's MLP is plain
        p, role = f"model.layers.{i}", f"layers.{i}"
        for place, module in llama.LLAMA_NORMS.items():
            plan[f"{role}.{place}.bias"] = plain(f"{p}.{module}.bias", (c,))
        plan[f"{role}.mlp.fc_weight"] = linear(f"{p}.mlp.c_fc.weight", f, c)
        plan[f"{role}.mlp.proj_weight"] = linear(f"{p}.mlp.c_proj.weight", c, f)
        if use_bias:
            a = cfg.layers[i].attention
            widths = {"q": a.num_heads * a.head_dim, "k": a.kv_heads * a.head_dim, "o": c}
            widths["v"] = widths["k"]
            for part, width in widths.items():
                plan[f"{role}.{part}.bias"] = plain(f"{p}.self_attn.{part}_proj.bias", (width,))
            plan[f"{role}.mlp.fc_bias"] = plain(f"{p}.mlp.c_fc.bias", (f,))
            plan[f"{role}.mlp.proj_bias"] = plain(f"{p}.mlp.c_proj.bias", (c,))
    return plan


ARCHITECTURE = Architecture(
    name="starcoder2",
    hf_architectures=("Starcoder2ForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
)
