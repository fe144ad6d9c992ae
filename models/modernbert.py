"""ModernBERT (ModernBertModel): token embeddings + LayerNorm, pre-norm layers with RoPE,
global layers (every key) and local layers (keys within ``local_attention / 2`` positions,
both sides), a GeGLU MLP (``gelu(x W_i[:F]) * x W_i[F:]``), a final LayerNorm; no biases by
default (``attention_bias``, ``mlp_bias``, ``norm_bias`` switch them on).

Layer types come from ``layer_types`` (transformers 5) or ``global_attn_every_n_layers``
(layer ``i`` is global when ``i % n == 0``, the hub's original files); the RoPE bases from
``rope_parameters[type].rope_theta`` or ``global_rope_theta`` / ``local_rope_theta``. The
first layer has no ``attn_norm`` (an identity). Names as ``ModernBertModel`` writes them; a
task model stores them under ``model.`` and its head is left out.
"""

from collections.abc import Mapping

from graphattn.encoder_spec import EncoderConfig, EncoderLayerSpec
from graphattn.models.common import (
    ACTIVATIONS,
    FULL,
    SLIDING,
    activation,
    finite,
    integer,
    layer_types,
    linear,
    number,
    optional,
    optional_roles,
    plain,
    refuse,
    sliced_bias,
    sliced_linear,
)
from graphattn.spec import Architecture, MlpSpec, NormSpec, RopeSpec, WeightSource, rows

THETA_KEYS = {FULL: ("global_rope_theta", 160000.0), SLIDING: ("local_rope_theta", 10000.0)}


def _prefix(config: Mapping[str, object]) -> str:
    architectures = config.get("architectures") or []
    if isinstance(architectures, list) and architectures and architectures[0] != "ModernBertModel":
        return "model."
    return ""


def _types(config: Mapping[str, object], count: int) -> list[str]:
    if config.get("layer_types") is not None:
        return layer_types(config, count)
    every = integer(config, "global_attn_every_n_layers", default=3)
    return [FULL if i % every == 0 else SLIDING for i in range(count)]


def _theta(config: Mapping[str, object], kind: str) -> float:
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and isinstance(params.get(kind), Mapping):
        entry = params[kind]
        rope_type = entry.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"config.json rope_parameters {kind} rope_type={rope_type!r}")
        if entry.get("rope_theta") is not None:
            return finite("rope_theta", entry["rope_theta"])
    key, default = THETA_KEYS[kind]
    return number(config, key, default)


def config_from_hf(config: Mapping[str, object]) -> EncoderConfig:
    """Map ModernBERT's ``config.json`` to an :class:`EncoderConfig`."""
    refuse(config, {"rope_scaling": None})
    hidden = integer(config, "hidden_size")
    heads = integer(config, "num_attention_heads")
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} is not a multiple of heads={heads}")
    head_dim = hidden // heads
    act = activation(config, "hidden_activation", "gelu", ACTIVATIONS)
    count = integer(config, "num_hidden_layers")
    local = integer(config, "local_attention", default=128, minimum=2)
    context = integer(config, "max_position_embeddings", default=8192)
    ropes = {kind: RopeSpec(head_dim, _theta(config, kind), context=context) for kind in THETA_KEYS}
    layers = tuple(
        # HF keeps |q - k| <= local_attention // 2; our window W keeps |q - k| < W
        EncoderLayerSpec(window=None if kind == FULL else local // 2 + 1, rope=ropes[kind])
        for kind in _types(config, count)
    )
    return EncoderConfig(
        model_type="modernbert",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        num_heads=heads,
        head_dim=head_dim,
        mlp=MlpSpec("gated", act, integer(config, "intermediate_size")),
        norm=NormSpec("layer", number(config, "norm_eps", 1e-5)),
        layers=layers,
        context_length=context,
        norm_placement="pre",
        positions="rope",
        type_vocab_size=0,
        embedding_norm=True,
        final_norm=True,
        pad_token_id=optional(config, "pad_token_id", None),
        checkpoint_prefix=_prefix(config),
    )


def weights(cfg: EncoderConfig) -> dict[str, WeightSource]:
    """Roles → tensors: ``Wqkv [3C, C]`` cut into q/k/v rows, ``Wi [2F, C]`` into the gated
    (first) and linear (second) halves; biases and norm biases where the checkpoint has them."""
    c, f, p = cfg.hidden_size, cfg.intermediate_size, cfg.checkpoint_prefix
    plan = {
        "embed_tokens": plain(f"{p}embeddings.tok_embeddings.weight", (cfg.vocab_size, c)),
        "embed_norm.weight": plain(f"{p}embeddings.norm.weight", (c,)),
        "embed_norm.bias": plain(f"{p}embeddings.norm.bias", (c,), optional=True),
        "final_norm.weight": plain(f"{p}final_norm.weight", (c,)),
        "final_norm.bias": plain(f"{p}final_norm.bias", (c,), optional=True),
    }
    for i in range(cfg.num_layers):
        layer, role = f"{p}layers.{i}", f"layers.{i}"
        qkv = f"{layer}.attn.Wqkv"
        for index, part in enumerate("qkv"):
            span = (index * c, (index + 1) * c)
            take = rows(*span)
            plan[f"{role}.{part}.weight"] = sliced_linear(
                f"{qkv}.weight", span, 3 * c, c, take, part
            )
            bias = sliced_bias(f"{qkv}.bias", 3 * c, c, take, part)
            optional_roles(plan, [(f"{role}.{part}.bias", bias)])
        plan[f"{role}.o.weight"] = linear(f"{layer}.attn.Wo.weight", c, c)
        plan[f"{role}.o.bias"] = plain(f"{layer}.attn.Wo.bias", (c,), optional=True)
        wi = f"{layer}.mlp.Wi"
        for index, part in enumerate(("gate", "up")):
            span = (index * f, (index + 1) * f)
            take = rows(*span)
            plan[f"{role}.mlp.{part}_weight"] = sliced_linear(
                f"{wi}.weight", span, 2 * f, c, take, part
            )
            bias = sliced_bias(f"{wi}.bias", 2 * f, f, take, part)
            optional_roles(plan, [(f"{role}.mlp.{part}_bias", bias)])
        plan[f"{role}.mlp.down_weight"] = linear(f"{layer}.mlp.Wo.weight", c, f)
        plan[f"{role}.mlp.down_bias"] = plain(f"{layer}.mlp.Wo.bias", (c,), optional=True)
        norms = ("mlp_norm",) if i == 0 else ("attn_norm", "mlp_norm")
        for place in norms:
            plan[f"{role}.{place}.weight"] = plain(f"{layer}.{place}.weight", (c,))
            plan[f"{role}.{place}.bias"] = plain(f"{layer}.{place}.bias", (c,), optional=True)
    return plan


ARCHITECTURE = Architecture(
    name="modernbert",
    hf_architectures=("ModernBertModel", "ModernBertForMaskedLM"),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored_prefixes=("head.", "decoder.", "classifier.", "model.head."),
)
