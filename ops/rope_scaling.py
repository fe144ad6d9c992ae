"""RoPE frequency scaling, every type Hugging Face transformers' ``ROPE_INIT_FUNCTIONS`` applies
to a plain rotary embedding, as float64 NumPy math at build time.

:func:`rope_frequencies` turns ``theta``, the rotated width ``rotary_dim`` (``R = rotary_dim // 2``
frequencies) and a ``rope_scaling`` / ``rope_parameters`` mapping into a
:class:`RopeFrequencies`: the ``inv_freq [R]`` a call uses, the ``attention_factor`` that
multiplies ``cos`` and ``sin``, and, for the two types whose frequencies depend on the call, what
the graph needs to choose at run time:

- ``longrope``: ``long_inv_freq [R]`` replaces ``inv_freq`` for a whole call when
  ``max(position_ids) + 1 > switch_length`` (``original_max_position_embeddings``), as in
  transformers' ``longrope_frequency_update``; the choice is made per call, with no memory.
- ``dynamic`` (NTK-aware): ``dynamic`` holds what :func:`dynamic_inv_freq` needs to recompute the
  frequencies of a call of length ``seq_len = max(position_ids) + 1``: the defaults while
  ``seq_len <= max_position_embeddings``, a larger base beyond it.

Types: ``default`` (or no mapping), ``linear``, ``dynamic``, ``yarn``, ``longrope``, ``llama3``.
The type is read from ``"rope_type"`` or, failing that, the older ``"type"``. Keys that do not
change the math here (``rope_type``, ``type``, ``rope_theta``, ``partial_rotary_factor``: the
caller has already turned the last one into ``rotary_dim``) are accepted; every other key must be
one this module implements for the type, so a mapping that asks for math this module does not do
(``mrope_section``, Phi-MoE's ``short_mscale`` ...) is refused by name instead of ignored.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SUPPORTED_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")

# Keys that name or describe the rotation but do not change the frequencies computed here.
_NEUTRAL_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})

# Per type, the keys whose math this module implements.
_TYPE_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "dynamic": frozenset({"factor"}),
    "yarn": frozenset(
        {
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        }
    ),
    "longrope": frozenset(
        {
            "short_factor",
            "long_factor",
            "factor",
            "attention_factor",
            "original_max_position_embeddings",
        }
    ),
    "llama3": frozenset(
        {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    ),
}

# Types transformers knows that are not plain frequency scalings of a rotary_dim-wide rotation.
_NOT_SUPPORTED_HINTS = {
    "proportional": (
        "it rotates the whole head_dim with frequencies spaced by head_dim and zero frequencies "
        "past partial_rotary_factor, which a rotary_dim-wide rotation cannot express"
    ),
    "su": "it is Phi-3's old name for 'longrope': map it to 'longrope' in the model's config",
}


@dataclass(frozen=True)
class DynamicNTK:
    """Dynamic NTK-aware scaling: the base grows with the call's length past ``original_length``.

    ``base``: the rope theta; ``factor``: the scaling factor; ``original_length``:
    ``max_position_embeddings`` (transformers compares the call's length with that, not with
    ``original_max_position_embeddings``); ``rotary_dim``: the rotated width
    (``R = rotary_dim // 2`` frequencies).
    """

    base: float
    factor: float
    original_length: int
    rotary_dim: int


@dataclass(frozen=True, eq=False)  # eq=False: the arrays make field-wise == ambiguous
class RopeFrequencies:
    """What a graph needs to build ``cos, sin [B, S, R]`` (``R = rotary_dim // 2``).

    ``inv_freq [R]`` float64: the frequencies of a call (for ``longrope``, of a call with
    ``max(position_ids) + 1 <= switch_length``; for ``dynamic``, of a call no longer than
    ``dynamic.original_length``). ``attention_factor``: ``cos`` and ``sin`` are multiplied by it
    (``yarn``, ``longrope``; 1.0 otherwise). ``long_inv_freq [R]`` float64 and ``switch_length``
    (``longrope`` only): a call with ``max(position_ids) + 1 > switch_length`` uses
    ``long_inv_freq`` for all its positions. ``dynamic`` (``dynamic`` only): pass it and the call's
    ``max(position_ids) + 1`` to :func:`dynamic_inv_freq`. The arrays are read-only.
    """

    inv_freq: np.ndarray
    attention_factor: float
    long_inv_freq: np.ndarray | None = None
    switch_length: int | None = None
    dynamic: DynamicNTK | None = None


def rope_frequencies(
    rotary_dim: int,
    theta: float,
    scaling: Mapping[str, object] | None,
    *,
    max_position_embeddings: int,
    original_max_position_embeddings: int | None = None,
) -> RopeFrequencies:
    """The frequencies of HF ``rope_scaling`` / ``rope_parameters`` ``scaling`` for a rotation of
    ``rotary_dim`` channels (``inv_freq [rotary_dim // 2]`` float64) with base ``theta``.

    ``max_position_embeddings``: the config's (dynamic NTK's threshold; the default ``factor`` of
    ``yarn`` and ``longrope`` is ``max_position_embeddings / original_max_position_embeddings``).
    ``original_max_position_embeddings``: the config's top-level value (Phi-3 keeps it there); as
    in transformers it takes precedence over the one inside ``scaling``, and both default to
    ``max_position_embeddings``. Raises ValueError naming the key for a missing, bad or
    unimplemented key, and naming the type (listing the supported ones) for an unknown type.
    """
    rotary_dim = _rotary_dim(rotary_dim)
    theta = _positive(theta, "rope_theta")
    max_position_embeddings = _positive_int(max_position_embeddings, "max_position_embeddings")
    if original_max_position_embeddings is not None:
        original_max_position_embeddings = _positive_int(
            original_max_position_embeddings, "original_max_position_embeddings"
        )
    if scaling is None:
        scaling = {}
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope scaling must be a mapping or None, got {type(scaling).__name__}")
    kind = _rope_type(scaling)
    _check_keys(scaling, kind)
    if scaling.get("rope_theta") is not None:
        in_scaling = _positive(scaling["rope_theta"], "rope_theta")
        if in_scaling != theta:
            raise ValueError(
                f"rope scaling 'rope_theta' is {in_scaling}, but theta is {theta}: they must agree"
            )

    default = _default_inv_freq(rotary_dim, theta)
    if kind == "default":
        return _frozen(default, 1.0)
    if kind == "linear":
        return _frozen(default / _required_positive(scaling, "factor"), 1.0)
    if kind == "dynamic":
        factor = _required_positive(scaling, "factor")
        if rotary_dim == 2:
            raise ValueError(
                "rope scaling 'dynamic' needs rotary_dim > 2 (its base grows with the power "
                "rotary_dim / (rotary_dim - 2)), got rotary_dim 2"
            )
        dynamic = DynamicNTK(theta, factor, max_position_embeddings, rotary_dim)
        return _frozen(default, 1.0, dynamic=dynamic)

    original = _original_length(scaling, original_max_position_embeddings, max_position_embeddings)
    if kind == "llama3":
        return _frozen(_llama3(default, scaling, original), 1.0)
    if kind == "yarn":
        return _yarn(default, theta, scaling, original, max_position_embeddings)
    return _longrope(rotary_dim, theta, scaling, original, max_position_embeddings)


def dynamic_inv_freq(dynamic: DynamicNTK, seq_len: int) -> np.ndarray:
    """inv_freq [rotary_dim // 2] float64 that transformers uses for a call of length ``seq_len``
    (``max(position_ids) + 1``) under dynamic NTK scaling.

    ``seq_len <= original_length``: the default frequencies. Beyond it the base becomes
    ``base * (factor * seq_len / original_length - (factor - 1)) ** (d / (d - 2))``,
    ``d = rotary_dim``. (transformers' module also remembers the longest call since it last saw one
    shorter than ``original_length`` and keeps that call's frequencies for shorter calls down to
    ``original_length``; for calls of non-decreasing length, as in one generation, the two agree.)
    """
    seq_len = _positive_int(seq_len, "seq_len")
    d = dynamic.rotary_dim
    if seq_len <= dynamic.original_length:
        return _readonly(_default_inv_freq(d, dynamic.base))
    growth = dynamic.factor * seq_len / dynamic.original_length - (dynamic.factor - 1.0)
    return _readonly(_default_inv_freq(d, dynamic.base * growth ** (d / (d - 2))))


def _default_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """[rotary_dim // 2] float64: ``theta ** (-2i / rotary_dim)``."""
    return 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)


def _llama3(default: np.ndarray, scaling: Mapping[str, object], original: int) -> np.ndarray:
    """Llama 3.1: wavelengths longer than ``original / low_freq_factor`` divided by ``factor``,
    shorter than ``original / high_freq_factor`` kept, a blend in ``original / wavelength`` between.
    """
    factor = _required_positive(scaling, "factor")
    low = _required_positive(scaling, "low_freq_factor")
    high = _required_positive(scaling, "high_freq_factor")
    if not high > low:
        raise ValueError(
            f"rope scaling 'high_freq_factor' ({high}) must be greater than "
            f"'low_freq_factor' ({low})"
        )
    wavelength = 2.0 * math.pi / default
    smooth = (original / wavelength - low) / (high - low)
    blended = (1.0 - smooth) * default / factor + smooth * default
    scaled = np.where(wavelength > original / low, default / factor, blended)
    return np.where(wavelength < original / high, default, scaled)


def _yarn(
    default: np.ndarray,
    theta: float,
    scaling: Mapping[str, object],
    original: int,
    max_position_embeddings: int,
) -> RopeFrequencies:
    """YaRN: a ramp over frequency index between extrapolation (kept) and interpolation
    (divided by ``factor``); ``cos``/``sin`` scaled by ``0.1 * ln(factor) + 1`` unless given."""
    if "factor" not in scaling:
        raise ValueError("rope scaling 'yarn' is missing 'factor'")
    if scaling["factor"] is None:  # transformers: the ratio of the two context lengths
        factor = max_position_embeddings / original
    else:
        factor = _positive(scaling["factor"], "factor")
    mscale = _optional_real(scaling, "mscale")
    mscale_all_dim = _optional_real(scaling, "mscale_all_dim")
    attention_factor = _optional_positive(scaling, "attention_factor")
    if attention_factor is None:
        # 0 or None count as unset, as in transformers; mscale alone is not used.
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    beta_fast = _optional_positive(scaling, "beta_fast", zero_is_unset=True) or 32.0
    beta_slow = _optional_positive(scaling, "beta_slow", zero_is_unset=True) or 1.0
    if beta_fast < beta_slow:
        raise ValueError(
            f"rope scaling 'beta_fast' ({beta_fast}) must not be below 'beta_slow' ({beta_slow})"
        )
    truncate = scaling.get("truncate", True)
    if truncate is not None and not isinstance(truncate, (bool, np.bool_)):
        raise ValueError(f"rope scaling 'truncate' must be a bool, got {truncate!r}")
    if theta == 1.0:
        raise ValueError("rope scaling 'yarn' needs 'rope_theta' != 1 (it divides by log(theta))")

    rotary_dim = 2 * default.shape[0]

    def dimension_of(rotations: float) -> float:  # the index whose wavelength fits `rotations`
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)  # transformers clamps to rotary_dim - 1
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(default.shape[0], dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    inv_freq = default / factor * ramp + default * (1.0 - ramp)
    return _frozen(inv_freq, float(attention_factor))


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _longrope(
    rotary_dim: int,
    theta: float,
    scaling: Mapping[str, object],
    original: int,
    max_position_embeddings: int,
) -> RopeFrequencies:
    """LongRoPE (Phi-3): per-frequency divisors ``short_factor`` / ``long_factor``;
    ``cos``/``sin`` scaled by ``sqrt(1 + ln(factor) / ln(original))`` unless given."""
    short = _factor_list(scaling, "short_factor", rotary_dim // 2)
    long = _factor_list(scaling, "long_factor", rotary_dim // 2)
    if scaling.get("factor") is None:  # transformers: the ratio of the two context lengths
        factor = max_position_embeddings / original
    else:
        factor = _positive(scaling["factor"], "factor")
    attention_factor = _optional_positive(scaling, "attention_factor")
    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        elif original == 1:
            raise ValueError(
                "rope scaling 'original_max_position_embeddings' must be > 1 to derive "
                "longrope's attention_factor (it divides by its log)"
            )
        else:
            attention_factor = math.sqrt(1.0 + math.log(factor) / math.log(original))
    wavelengths = theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    return _frozen(
        1.0 / (short * wavelengths),
        float(attention_factor),
        long_inv_freq=1.0 / (long * wavelengths),
        switch_length=original,
    )


def _frozen(
    inv_freq: np.ndarray,
    attention_factor: float,
    *,
    long_inv_freq: np.ndarray | None = None,
    switch_length: int | None = None,
    dynamic: DynamicNTK | None = None,
) -> RopeFrequencies:
    return RopeFrequencies(
        _readonly(inv_freq),
        attention_factor,
        None if long_inv_freq is None else _readonly(long_inv_freq),
        switch_length,
        dynamic,
    )


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float64)
    array.setflags(write=False)
    return array


def _rope_type(scaling: Mapping[str, object]) -> str:
    """``rope_type``, else the older ``type``, else ``default`` (transformers' precedence)."""
    kind = scaling.get("rope_type")
    if kind is None:
        kind = scaling.get("type")
    if kind is None:
        return "default"
    if kind not in SUPPORTED_TYPES:
        hint = _NOT_SUPPORTED_HINTS.get(kind) if isinstance(kind, str) else None
        raise ValueError(
            f"rope scaling type {kind!r} is not supported"
            + (f" ({hint})" if hint else "")
            + f"; supported types: {', '.join(SUPPORTED_TYPES)}"
        )
    return kind  # type: ignore[return-value]


def _check_keys(scaling: Mapping[str, object], kind: str) -> None:
    known = _TYPE_KEYS[kind] | _NEUTRAL_KEYS
    unknown = sorted(str(key) for key in scaling if key not in known)
    if unknown:
        names = ", ".join(repr(key) for key in unknown)
        implemented = ", ".join(repr(key) for key in sorted(_TYPE_KEYS[kind])) or "none"
        raise ValueError(
            f"rope scaling key(s) {names} not implemented for rope type {kind!r}: they may change "
            f"the math, so they are refused rather than ignored (keys implemented for {kind!r}: "
            f"{implemented}; always accepted: {', '.join(sorted(_NEUTRAL_KEYS))})"
        )


def _original_length(
    scaling: Mapping[str, object], top_level: int | None, max_position_embeddings: int
) -> int:
    if top_level is not None:
        return top_level
    value = scaling.get("original_max_position_embeddings")
    if value is None:
        return max_position_embeddings
    return _positive_int(value, "original_max_position_embeddings")


def _factor_list(scaling: Mapping[str, object], key: str, length: int) -> np.ndarray:
    if key not in scaling:
        raise ValueError(f"rope scaling 'longrope' is missing {key!r}")
    values = scaling[key]
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise ValueError(f"rope scaling {key!r} must be a list of numbers, got {values!r}")
    if len(values) != length:  # type: ignore[arg-type]
        raise ValueError(
            f"rope scaling {key!r} must have rotary_dim // 2 = {length} entries, got {len(values)}"  # type: ignore[arg-type]
        )
    return np.array([_positive(v, key) for v in values], dtype=np.float64)  # type: ignore[union-attr]


def _rotary_dim(value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"rotary_dim must be an even int >= 2, got {value!r}")
    if value < 2 or value % 2:
        raise ValueError(f"rotary_dim must be an even int >= 2, got {value}")
    return int(value)


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"rope scaling {key!r} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"rope scaling {key!r} must be a positive int, got {value}")
    return int(value)


def _real(value: object, key: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"rope scaling {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"rope scaling {key!r} must be finite, got {value}")
    return value


def _positive(value: object, key: str) -> float:
    value = _real(value, key)
    if not value > 0:
        raise ValueError(f"rope scaling {key!r} must be positive, got {value}")
    return value


def _required_positive(scaling: Mapping[str, object], key: str) -> float:
    if scaling.get(key) is None:
        raise ValueError(f"rope scaling is missing {key!r}")
    return _positive(scaling[key], key)


def _optional_real(scaling: Mapping[str, object], key: str) -> float | None:
    value = scaling.get(key)
    return None if value is None else _real(value, key)


def _optional_positive(
    scaling: Mapping[str, object], key: str, *, zero_is_unset: bool = False
) -> float | None:
    value = _optional_real(scaling, key)
    if value is None or (zero_is_unset and value == 0):
        return None
    if not value > 0:
        raise ValueError(f"rope scaling {key!r} must be positive, got {value}")
    return value
