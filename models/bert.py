"""BERT (BertModel): word + absolute position + token-type embeddings, an embedding LayerNorm,
post-norm layers (``LN(x + attn(x))``, ``LN(h + gelu_mlp(h))``), every projection biased.

Checkpoint names as ``BertModel.save_pretrained`` writes them (``embeddings.*``,
``encoder.layer.{i}.*``); a task model (``BertForMaskedLM``, ...) stores the same under
``bert.``, and its head (``cls.*``, ``classifier.*``) and the pooler are left out.
"""

from collections.abc import Mapping

from graphattn.encoder_spec import EncoderConfig, EncoderLayerSpec
from graphattn.models.common import (
    ACTIVATIONS,
    activation,
    head_dim_of,
    integer,
    linear,
    number,
    optional,
    plain,
    refuse,
)
from graphattn.spec import Architecture, MlpSpec, NormSpec, WeightSource


def _prefix(config: Mapping[str, object]) -> str:
    """``bert.`` for a task model (its encoder sits under that name), else none."""
    architectures = config.get("architectures") or []
    if isinstance(architectures, list) and architectures and architectures[0] != "BertModel":
        return "bert."
    return ""


def config_from_hf(config: Mapping[str, object]) -> EncoderConfig:
    """Map BERT's ``config.json`` to an :class:`EncoderConfig` (refusing what changes the math
    in ways not built: relative position embeddings, decoder or cross-attention use)."""
    refuse(
        config,
        {
            "position_embedding_type": "absolute",
            "is_decoder": False,
            "add_cross_attention": False,
        },
    )
    hidden = integer(config, "hidden_size")
    heads = integer(config, "num_attention_heads")
    head_dim = head_dim_of(config, hidden, heads)
    if heads * head_dim != hidden:
        raise ValueError(f"config num_attention_heads={heads} does not divide hidden={hidden}")
    act = activation(config, "hidden_act", "gelu", ACTIVATIONS)
    if act not in ("gelu", "gelu_tanh", "relu", "silu"):
        raise ValueError(f"config.json hidden_act={config.get('hidden_act')!r} is not supported")
    epsilon = number(config, "layer_norm_eps", 1e-12)
    return EncoderConfig(
        model_type="bert",
        vocab_size=integer(config, "vocab_size"),
        hidden_size=hidden,
        num_heads=heads,
        head_dim=head_dim,
        mlp=MlpSpec("plain", act, integer(config, "intermediate_size")),
        norm=NormSpec("layer", epsilon),
        layers=(EncoderLayerSpec(),) * integer(config, "num_hidden_layers"),
        context_length=integer(config, "max_position_embeddings", default=512),
        norm_placement="post",
        positions="learned",
        type_vocab_size=integer(config, "type_vocab_size", default=2, minimum=0),
        embedding_norm=True,
        pad_token_id=optional(config, "pad_token_id", None),
        checkpoint_prefix=_prefix(config),
    )


def weights(cfg: EncoderConfig) -> dict[str, WeightSource]:
    """Roles → checkpoint tensors (torch Linear ``[out, in]`` transposed to ``[in, out]``)."""
    c, f, p = cfg.hidden_size, cfg.intermediate_size, cfg.checkpoint_prefix
    e = f"{p}embeddings"
    plan = {
        "embed_tokens": plain(f"{e}.word_embeddings.weight", (cfg.vocab_size, c)),
        "embed_positions": plain(f"{e}.position_embeddings.weight", (cfg.context_length, c)),
        "embed_norm.weight": plain(f"{e}.LayerNorm.weight", (c,)),
        "embed_norm.bias": plain(f"{e}.LayerNorm.bias", (c,)),
    }
    if cfg.type_vocab_size:
        plan["embed_token_types"] = plain(
            f"{e}.token_type_embeddings.weight", (cfg.type_vocab_size, c)
        )
    for i in range(cfg.num_layers):
        layer = f"{p}encoder.layer.{i}"
        attn = f"{layer}.attention"
        for role, name, out_features, in_features in (
            ("q", f"{attn}.self.query", c, c),
            ("k", f"{attn}.self.key", c, c),
            ("v", f"{attn}.self.value", c, c),
            ("o", f"{attn}.output.dense", c, c),
            ("mlp.fc", f"{layer}.intermediate.dense", f, c),
            ("mlp.proj", f"{layer}.output.dense", c, f),
        ):
            joiner = "_" if role.startswith("mlp.") else "."
            plan[f"layers.{i}.{role}{joiner}weight"] = linear(
                f"{name}.weight", out_features, in_features
            )
            plan[f"layers.{i}.{role}{joiner}bias"] = plain(f"{name}.bias", (out_features,))
        for role, name in (
            ("post_attn_norm", f"{attn}.output.LayerNorm"),
            ("post_mlp_norm", f"{layer}.output.LayerNorm"),
        ):
            plan[f"layers.{i}.{role}.weight"] = plain(f"{name}.weight", (c,))
            plan[f"layers.{i}.{role}.bias"] = plain(f"{name}.bias", (c,))
    return plan


ARCHITECTURE = Architecture(
    name="bert",
    hf_architectures=("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=("embeddings.position_ids", "embeddings.token_type_ids"),
    ignored_prefixes=("pooler.", "bert.pooler.", "cls.", "classifier."),
)
