"""Helpers shared by architecture files: reading HF config keys with clear errors, RoPE and
layer types as transformers writes them, and the weight-plan vocabulary."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from graphattn.spec import (
    NormSpec,
    RopeSpec,
    Transform,
    WeightSource,
    compose,
    transpose,
)

FULL, SLIDING = "full_attention", "sliding_attention"


def require(config: Mapping[str, object], *keys: str) -> object:
    """The first of ``keys`` present in an HF ``config.json``; ValueError naming them if none is."""
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    raise ValueError(f"config.json is missing {' / '.join(repr(k) for k in keys)}")


def optional(config: Mapping[str, object], key: str, default: object) -> object:
    """``config[key]`` when present and not null, else ``default``."""
    value = config.get(key)
    return default if value is None else value


# Sizes beyond these are not a model this exporter can build (and would only exhaust memory).
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 1024


def _as_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json {key!r} must be an integer, got {value!r}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ValueError(f"config.json {key!r} must be an integer, got {value!r}")
    value = int(value)
    if not minimum <= value <= MAX_SIZE:
        raise ValueError(f"config.json {key!r} must be in [{minimum}, {MAX_SIZE}], got {value}")
    if key in ("num_hidden_layers", "n_layer", "num_layers") and value > MAX_LAYERS:
        raise ValueError(f"config.json {key!r} must be at most {MAX_LAYERS}, got {value}")
    return value


def integer(
    config: Mapping[str, object], *keys: str, default: object = None, minimum: int = 1
) -> int:
    """An int config value (the first key present, at least ``minimum``), else ``default``;
    ValueError naming the key for anything else (bools, fractions, infinities, huge)."""
    present = [k for k in keys if config.get(k) is not None]
    if not present:
        if default is None:
            require(config, *keys)  # raises, naming the keys
        return int(default)
    return _as_int(present[0], config[present[0]], minimum)


def number(config: Mapping[str, object], key: str, default: float | None) -> float | None:
    """A finite float config value, ``default`` when absent; ValueError naming the key."""
    value = config.get(key)
    if value is None:
        return default
    return finite(key, value)


def finite(key: str, value: object) -> float:
    """``value`` as a finite float; ValueError naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json {key!r} must be a finite number, got {value!r}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"config.json {key!r} is too large") from None
    if not math.isfinite(result):
        raise ValueError(f"config.json {key!r} must be a finite number, got {value!r}")
    return result


def refuse(config: Mapping[str, object], unsupported: Mapping[str, object]) -> None:
    """ValueError naming the first key whose value changes the math in a way we do not
    implement: ``unsupported`` maps a key to its only accepted value (or a predicate)."""
    for key, accepted in unsupported.items():
        if key not in config:
            continue
        value = config[key]
        ok = accepted(value) if callable(accepted) else value == accepted or value is None
        if not ok:
            raise ValueError(f"config.json {key}={value!r} is not supported")


def activation(config: Mapping[str, object], key: str, default: str, known: Mapping[str, str]):
    """Our activation name for HF's ``config[key]``; ValueError naming unknown ones."""
    value = str(optional(config, key, default))
    if value not in known:
        raise ValueError(
            f"config.json {key}={value!r} is not supported (known: {', '.join(sorted(known))})"
        )
    return known[value]


# HF activation names (ACT2FN) → ours.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
}


def head_dim_of(config: Mapping[str, object], hidden: int, heads: int) -> int:
    """``head_dim`` from the config, else hidden / heads (which must divide)."""
    if config.get("head_dim") is not None:
        return integer(config, "head_dim")
    if hidden % heads:
        raise ValueError(f"config hidden_size={hidden} is not a multiple of heads={heads}")
    return hidden // heads


def layer_types(config: Mapping[str, object], count: int, default: str = FULL) -> list[str]:
    """Per-layer attention types (``full_attention`` / ``sliding_attention``) from HF's
    ``layer_types``, else every layer ``default``."""
    types = config.get("layer_types")
    if types is None:
        return [default] * count
    if not isinstance(types, list) or len(types) != count:
        raise ValueError(f"config.json layer_types must list {count} layer types, got {types!r}")
    unknown = sorted({repr(t) for t in types if not isinstance(t, str) or t not in (FULL, SLIDING)})
    if unknown:
        raise ValueError(f"config.json layer_types {unknown} are not supported")
    return list(types)


def rope_parameters(config: Mapping[str, object], layer_type: str | None = None) -> dict:
    """One RoPE parameter dict as transformers 5 writes it (``rope_parameters``, possibly per
    layer type) or as older files do (``rope_theta`` + ``rope_scaling``); ``rope_type`` set."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"config.json rope_parameters has no entry for {layer_type!r}")
    merged: dict = {}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, Mapping):
        merged.update(scaling)
    if isinstance(params, Mapping):
        merged.update(params)
    merged.setdefault("rope_theta", optional(config, "rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type")) or "default"
    merged["rope_type"] = kind
    merged.pop("type", None)
    return merged


def rope_spec(
    config: Mapping[str, object],
    head_dim: int,
    *,
    layer_type: str | None = None,
    interleaved: bool = False,
    partial: float | None = None,
    rotary_dim: int | None = None,
) -> RopeSpec:
    """The RoPE of a layer: ``rotary_dim`` from ``partial_rotary_factor`` (or given), base
    and scaling from :func:`rope_parameters`."""
    params = rope_parameters(config, layer_type)
    if rotary_dim is None:
        if partial is None:
            partial = finite(
                "partial_rotary_factor",
                params.get("partial_rotary_factor", optional(config, "partial_rotary_factor", 1.0)),
            )
        if not 0 < partial <= 1:
            raise ValueError(f"config.json partial_rotary_factor must be in (0, 1], got {partial}")
        rotary_dim = int(head_dim * partial) // 2 * 2
    theta = finite("rope_theta", params.pop("rope_theta"))
    params.pop("partial_rotary_factor", None)
    scaling = None if params["rope_type"] == "default" and len(params) == 1 else params
    original = config.get("original_max_position_embeddings")
    return RopeSpec(
        rotary_dim=rotary_dim,
        theta=theta,
        scaling=scaling,
        interleaved=interleaved,
        original_context=None
        if original is None
        else _as_int("original_max_position_embeddings", original, 1),
        context=integer(config, "max_position_embeddings", default=2048),
    )


def norm_spec(config: Mapping[str, object], kind: str, *keys: str, default: float = 1e-6):
    """A :class:`NormSpec` with epsilon from the first of ``keys`` present."""
    for key in keys:
        value = number(config, key, None)
        if value is not None:
            return NormSpec(kind, value)
    return NormSpec(kind, default)


# ------------------------------------------------------------------------ weight plans
def plain(name: str, shape: tuple[int, ...], fix: Transform | None = None, **kw) -> WeightSource:
    """A tensor read as it is (plus an optional fix-up that keeps its shape)."""
    return WeightSource(name, name, shape, fix, **kw)


def linear(
    name: str, out_features: int, in_features: int, fix: Transform | None = None, **kw
) -> WeightSource:
    """A torch Linear weight ``[out, in]`` → ``[in, out]`` (after ``fix`` on the torch rows)."""
    return WeightSource(
        name,
        name,
        (out_features, in_features),
        compose(fix, transpose),
        (in_features, out_features),
        **kw,
    )


def sliced_linear(
    name: str, rows: tuple[int, int], total: int, in_features: int, take: Transform, part: str
) -> WeightSource:
    """Rows ``rows`` of a fused torch Linear ``[total, in]`` (by ``take``), as ``[in, out]``."""
    width = rows[1] - rows[0]
    return WeightSource(
        f"{name}.{part}", name, (total, in_features), compose(take, transpose), (in_features, width)
    )


def sliced_bias(name: str, total: int, width: int, take: Transform, part: str) -> WeightSource:
    """The matching slice of a fused bias ``[total]``."""
    return WeightSource(f"{name}.{part}", name, (total,), take, (width,))


def tied_head(plan: dict, tied: bool, name: str, shape: tuple[int, int]) -> None:
    """``lm_head.weight``: the embedding table when tied, else its own tensor ``name``."""
    plan["lm_head.weight"] = plan["embed_tokens"] if tied else plain(name, shape)


def optional_roles(plan: dict, roles: Iterable[tuple[str, WeightSource]]) -> None:
    """Add roles that exist only when the checkpoint has them (biases the config does not
    announce): ``plan_weights`` drops those absent from the checkpoint."""
    for role, source in roles:
        plan[role] = WeightSource(
            source.name,
            source.source,
            source.shape,
            source.transform,
            source.out_shape,
            optional=True,
        )


def alibi_slopes(heads: int) -> tuple[float, ...]:
    """ALiBi's per-head slopes (Press et al.; as Bloom and Falcon build them): a geometric
    sequence for the largest power of two ≤ heads, then every other slope of the next one."""
    closest = 2 ** int(math.floor(math.log2(heads)))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**power for power in range(1, closest + 1)]
    if closest != heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, heads - closest)
        slopes += [extra**power for power in range(1, 2 * remaining, 2)]
    return tuple(slopes)


def token_ids(config: Mapping[str, object]) -> dict[str, object]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for ModelConfig (None if absent)."""
    return {key: optional(config, key, None) for key in TOKEN_ID_KEYS}


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def plain_mlp_weights(
    plan: dict, role: str, fc: str, proj: str, width: int, hidden: int, biases: bool = True
) -> None:
    """A non-gated MLP's roles (``mlp.fc_weight`` ``[hidden, width]``, ``mlp.proj_weight``
    ``[width, hidden]``, and their biases when ``biases``) from torch Linears ``fc``/``proj``
    (module paths without ``.weight``)."""
    plan[f"{role}.mlp.fc_weight"] = linear(f"{fc}.weight", width, hidden)
    plan[f"{role}.mlp.proj_weight"] = linear(f"{proj}.weight", hidden, width)
    if biases:
        plan[f"{role}.mlp.fc_bias"] = plain(f"{fc}.bias", (width,))
        plan[f"{role}.mlp.proj_bias"] = plain(f"{proj}.bias", (hidden,))
