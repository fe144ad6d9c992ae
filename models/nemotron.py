"""Nemotron (NemotronForCausalLM): ``layernorm1p``, a squared-ReLU MLP, partial RoPE.

Every norm (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``) is a LayerNorm
with bias whose scale is ``1 + weight`` (fix-up ``plus_one``), epsilon ``norm_eps``. The MLP is
not gated: ``down_proj(relu(up_proj(x))²)`` (``hidden_act``), biases with ``mlp_bias``;
q/k/v/o biases with ``attention_bias``; ``head_dim`` may differ from hidden / heads; the first
``partial_rotary_factor`` (0.5 when absent, as in NemotronConfig) of each head rotates.
"""

from collections.abc import Mapping

from graphattn.models import llama
from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    linear,
    norm_spec,
    optional_roles,
    plain,
    rope_spec,
    tied_head,
)
from graphattn.models.phi import partial_rotary
from graphattn.spec import (
    Architecture,
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    WeightSource,
    plus_one,
)

PARTIAL_ROTARY = 0.5  # NemotronConfig's default


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a Nemotron ``config.json`` to ModelConfig."""
    d = llama.dims(config)
    norm = norm_spec(config, "layer", "norm_eps", default=1e-5)
    rope = rope_spec(config, d.head_dim, partial=partial_rotary(config, PARTIAL_ROTARY))
    act = activation(config, "hidden_act", "relu2", ACTIVATIONS)
    layer = LayerSpec(
        attention=AttentionSpec(d.heads, d.kv_heads, d.head_dim, rope=rope),
        mlp=MlpSpec("plain", act, d.intermediate),
        norms={"attn_norm": norm, "mlp_norm": norm},
    )
    return llama.model_config(config, "nemotron", [layer] * d.layers, norm)


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → NemotronForCausalLM tensors (norm weights as ``1 + w``)."""
    c, v = cfg.hidden_size, cfg.vocab_size
    plan = {
        "embed_tokens": plain("model.embed_tokens.weight", (v, c)),
        "final_norm.weight": plain("model.norm.weight", (c,), plus_one),
        "final_norm.bias": plain("model.norm.bias", (c,)),
    }
    tied_head(plan, cfg.tie_word_embeddings, "lm_head.weight", (v, c))
    for i, layer in enumerate(cfg.layers):
        a, f = layer.attention, layer.mlp.intermediate_size
        p, role = f"model.layers.{i}", f"layers.{i}"
        for place, module in llama.LLAMA_NORMS.items():
            plan[f"{role}.{place}.weight"] = plain(f"{p}.{module}.weight", (c,), plus_one)
            plan[f"{role}.{place}.bias"] = plain(f"{p}.{module}.bias", (c,))
        q, kv = a.num_heads * a.head_dim, a.kv_heads * a.head_dim
        widths = {"q": (q, c), "k": (kv, c), "v": (kv, c), "o": (c, q)}
        for part, (out, inp) in widths.items():
            name = f"{p}.self_attn.{part}_proj"
            plan[f"{role}.{part}.weight"] = linear(f"{name}.weight", out, inp)
        plan[f"{role}.mlp.fc_weight"] = linear(f"{p}.mlp.up_proj.weight", f, c)
        plan[f"{role}.mlp.proj_weight"] = linear(f"{p}.mlp.down_proj.weight", c, f)
        biases = [
            (f"{role}.{part}.bias", plain(f"{p}.self_attn.{part}_proj.bias", (out,)))
            for part, (out, _) in widths.items()
        ]
        biases += [
            (f"{role}.mlp.fc_bias", plain(f"{p}.mlp.up_proj.bias", (f,))),
            (f"{role}.mlp.proj_bias", plain(f"{p}.mlp.down_proj.bias", (c,))),
        ]
        optional_roles(plan, biases)
    return plan


ARCHITECTURE = Architecture(
    name="nemotron",
    hf_architectures=("NemotronForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".rotary_emb.inv_freq",),
    genai_type="nemotron",
)
