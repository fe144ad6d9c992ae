"""Rotary position embeddings (RoPE): split-halves or interleaved pairs, full or partial.

``inverse_frequencies`` computes the ``R = rotary_dim / 2`` frequencies in NumPy at build time
from ``theta`` and an optional scaling (``linear`` or ``llama3``); the graph turns
``position_ids [B, S]`` into ``cos, sin [B, S, R]`` once and every layer rotates with them.
Only the first ``rotary_dim`` channels of each head rotate; the rest pass through.

- split-halves (Llama/GPT-NeoX): channel ``i < R`` pairs with channel ``i + R``;
- interleaved (GPT-J style): channel ``2i`` pairs with ``2i + 1``.
"""

import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank


def inverse_frequencies(
    rotary_dim: int, theta: float, scaling: Mapping[str, object] | None = None
) -> np.ndarray:
    """inv_freq [rotary_dim / 2] float32: ``theta ** (-2i / rotary_dim)``, then scaled.

    ``scaling``: None; ``{"type": "linear", "factor": f}`` (divide every frequency by f); or
    ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}`` (long wavelengths divided by ``factor``, short ones kept,
    a smooth blend between).
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2:
        raise ValueError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    inv_freq = 1.0 / (float(theta) ** exponents)
    kind = None if not scaling else scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv_freq = inv_freq / _factor(scaling, "factor")
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    else:
        raise ValueError(f"rope scaling type {kind!r} is not supported (use linear or llama3)")
    return inv_freq.astype(np.float32)


def _factor(scaling: Mapping[str, object], key: str) -> float:
    if key not in scaling:
        raise ValueError(f"rope scaling is missing {key!r}")
    value = float(scaling[key])  # type: ignore[arg-type]
    if not value > 0:
        raise ValueError(f"rope scaling {key} must be positive, got {value}")
    return value


def _llama3_scaled(inv_freq: np.ndarray, scaling: Mapping[str, object]) -> np.ndarray:
    factor = _factor(scaling, "factor")
    low = _factor(scaling, "low_freq_factor")
    high = _factor(scaling, "high_freq_factor")
    context = _factor(scaling, "original_max_position_embeddings")
    if high <= low:
        raise ValueError(
            f"rope scaling needs high_freq_factor > low_freq_factor, got {high}, {low}"
        )
    wavelength = 2 * math.pi / inv_freq
    # blend = 1 keeps a frequency, 0 divides it by factor; linear in context/wavelength between.
    blend = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
    return inv_freq * (blend + (1.0 - blend) / factor)


@graphattn_function
def RotaryAngles(position_ids_BS, inv_freq_R):
    """angles [B, S, R] float32 = ``position_ids [B, S] * inv_freq [R]`` (one output: the
    cos/sin functions below call it; onnxscript keeps only the first output of a nested call
    that has two)."""
    return op.Mul(op.Unsqueeze(op.Cast(position_ids_BS, to=1), [2]), op.Cast(inv_freq_R, to=1))


@graphattn_function
def RotaryCosSin(position_ids_BS, inv_freq_R):
    """cos, sin [B, S, R] float32 of ``position_ids [B, S] * inv_freq [R]``."""
    angles_BSR = RotaryAngles(position_ids_BS, inv_freq_R)
    return op.Cos(angles_BSR), op.Sin(angles_BSR)


@graphattn_function
def RotaryHalves(x_BHSD, cos_BSR, sin_BSR):
    """x [B, H, S, D] with channel i < R rotated against channel i + R (R = cos.shape[-1])."""
    half = op.Slice(op.Shape(cos_BSR), [2], [3])
    rotary = op.Add(half, half)
    first_BHSR = op.Slice(x_BHSD, [0], half, [3])
    second_BHSR = op.Slice(x_BHSD, half, rotary, [3])
    passed = op.Slice(x_BHSD, rotary, [9223372036854775807], [3])
    cos_B1SR = op.Unsqueeze(op.CastLike(cos_BSR, x_BHSD), [1])
    sin_B1SR = op.Unsqueeze(op.CastLike(sin_BSR, x_BHSD), [1])
    rotated_first = op.Sub(op.Mul(first_BHSR, cos_B1SR), op.Mul(second_BHSR, sin_B1SR))
    rotated_second = op.Add(op.Mul(second_BHSR, cos_B1SR), op.Mul(first_BHSR, sin_B1SR))
    return op.Concat(rotated_first, rotated_second, passed, axis=-1)


@graphattn_function
def RotaryInterleaved(x_BHSD, cos_BSR, sin_BSR):
    """x [B, H, S, D] with channel 2i rotated against channel 2i + 1 for i < R."""
    half = op.Slice(op.Shape(cos_BSR), [2], [3])
    rotary = op.Add(half, half)
    even_BHSR = op.Slice(x_BHSD, [0], rotary, [3], [2])
    odd_BHSR = op.Slice(x_BHSD, [1], rotary, [3], [2])
    passed = op.Slice(x_BHSD, rotary, [9223372036854775807], [3])
    cos_B1SR = op.Unsqueeze(op.CastLike(cos_BSR, x_BHSD), [1])
    sin_B1SR = op.Unsqueeze(op.CastLike(sin_BSR, x_BHSD), [1])
    rotated_even = op.Sub(op.Mul(even_BHSR, cos_B1SR), op.Mul(odd_BHSR, sin_B1SR))
    rotated_odd = op.Add(op.Mul(odd_BHSR, cos_B1SR), op.Mul(even_BHSR, sin_B1SR))
    pairs_BHSR2 = op.Concat(op.Unsqueeze(rotated_even, [4]), op.Unsqueeze(rotated_odd, [4]), axis=4)
    pairs_shape = op.Concat(op.Slice(op.Shape(x_BHSD), [0], [3]), rotary, axis=0)
    return op.Concat(op.Reshape(pairs_BHSR2, pairs_shape), passed, axis=-1)


def rotary_cos_sin(
    g: GraphEmitter,
    position_ids_BS: ir.Value,
    *,
    rotary_dim: int,
    theta: float,
    scaling: Mapping[str, object] | None = None,
    name: str = "rotary",
) -> tuple[ir.Value, ir.Value]:
    """Emit ``RotaryCosSin``; returns ``(cos, sin)`` [B, S, rotary_dim / 2] float32."""
    require_rank(position_ids_BS, 2, "position_ids")
    inv_freq = g.initializer(f"{name}.inv_freq", inverse_frequencies(rotary_dim, theta, scaling))
    return g.call(RotaryCosSin, [position_ids_BS, inv_freq], name=name, outputs=("cos", "sin"))


def apply_rotary(
    g: GraphEmitter,
    x_BHSD: ir.Value,
    cos_BSR: ir.Value,
    sin_BSR: ir.Value,
    *,
    head_dim: int,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    name: str,
) -> ir.Value:
    """Emit a rotation of ``x [B, H, S, head_dim]``; ``rotary_dim`` (default: head_dim) is even."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if rotary_dim % 2:
        what = "head_dim" if rotary_dim == head_dim else "rotary_dim"
        raise ValueError(f"{what} must be even for rotary embeddings, got {rotary_dim}")
    if not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be in [2, head_dim={head_dim}], got {rotary_dim}")
    require_rank(x_BHSD, 4, "x")
    function = RotaryInterleaved if interleaved else RotaryHalves
    return g.call(function, [x_BHSD, cos_BSR, sin_BSR], name=name)


@graphattn_function
def RotaryCosSinScaled(position_ids_BS, inv_freq_R, factor):
    """cos, sin [B, S, R] float32 of ``position_ids * inv_freq``, both times scalar ``factor``
    (YaRN's and LongRoPE's attention factor)."""
    angles_BSR = RotaryAngles(position_ids_BS, inv_freq_R)
    return op.Mul(op.Cos(angles_BSR), factor), op.Mul(op.Sin(angles_BSR), factor)


@graphattn_function
def RotaryCosSinSwitched(position_ids_BS, short_inv_freq_R, long_inv_freq_R, switch_length, factor):
    """LongRoPE: cos, sin [B, S, R] with the long frequencies when the call reaches past the
    original context (``max(position_ids) + 1 > switch_length``), else the short ones; times
    ``factor``."""
    length = op.Add(op.ReduceMax(position_ids_BS, keepdims=0), op.Constant(value_int=1))
    use_long = op.Greater(length, switch_length)
    inv_freq_R = op.Where(use_long, long_inv_freq_R, short_inv_freq_R)
    angles_BSR = RotaryAngles(position_ids_BS, inv_freq_R)
    return op.Mul(op.Cos(angles_BSR), factor), op.Mul(op.Sin(angles_BSR), factor)


@graphattn_function
def RotaryCosSinDynamic(position_ids_BS, inv_freq_R, exponents_R, base, factor, original_length):
    """Dynamic NTK: for a call of length ``L = max(position_ids) + 1`` beyond
    ``original_length``, frequencies ``base'^(-exponents)`` with
    ``base' = base * (factor L / original - (factor - 1)) ^ (d / (d - 2))`` (``exponents_R =
    2i / d``, d = 2R); else ``inv_freq``. Returns cos, sin [B, S, R] float32."""
    length = op.Add(op.ReduceMax(position_ids_BS, keepdims=0), op.Constant(value_int=1))
    length_f = op.Cast(length, to=1)
    original_f = op.Cast(original_length, to=1)
    two_r = op.Cast(op.Mul(op.Shape(exponents_R), op.Constant(value_int=2)), to=1)
    power = op.Div(two_r, op.Sub(two_r, op.Constant(value_float=2.0)))
    stretch = op.Sub(
        op.Div(op.Mul(factor, length_f), original_f), op.Sub(factor, op.Constant(value_float=1.0))
    )
    new_base = op.Mul(base, op.Pow(stretch, op.Squeeze(power)))
    dynamic_R = op.Reciprocal(op.Pow(new_base, exponents_R))
    inv_R = op.Where(op.Greater(length, original_length), dynamic_R, inv_freq_R)
    angles_BSR = RotaryAngles(position_ids_BS, inv_R)
    return op.Cos(angles_BSR), op.Sin(angles_BSR)
