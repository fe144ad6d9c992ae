"""Normalizations over the last axis: RMSNorm, LayerNorm, and QK-norm (RMSNorm over head_dim)."""

import onnx_ir as ir

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter


@graphattn_function
def RMSNorm(x, weight, epsilon: float):
    """y (shape of x [..., C]) = x / sqrt(mean(x², last axis) + epsilon) * weight [C], fp32 math."""
    x_f32 = op.Cast(x, to=1)
    mean_square = op.ReduceMean(op.Mul(x_f32, x_f32), [-1], keepdims=1)
    inv_rms = op.Reciprocal(op.Sqrt(op.Add(mean_square, op.Constant(value_float=epsilon))))
    normalized = op.CastLike(op.Mul(x_f32, inv_rms), x)
    return op.Mul(normalized, op.CastLike(weight, x))


@graphattn_function
def LayerNorm(x, weight, bias, epsilon: float):
    """y (shape of x [..., C]) = (x - mean) / sqrt(var + epsilon) * weight [C] + bias [C]."""
    return op.LayerNormalization(x, weight, bias, axis=-1, epsilon=epsilon)


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    return float(epsilon)


def rms_norm(g: GraphEmitter, x: ir.Value, weight: ir.Value, *, epsilon: float, name: str):
    """Emit ``RMSNorm`` of ``x [..., C]`` with ``weight [C]``."""
    return g.call(RMSNorm, [x, weight], {"epsilon": _check_epsilon(epsilon)}, name=name)


def layer_norm(
    g: GraphEmitter, x: ir.Value, weight: ir.Value, bias: ir.Value, *, epsilon: float, name: str
):
    """Emit ``LayerNorm`` of ``x [..., C]`` with ``weight, bias [C]``."""
    return g.call(LayerNorm, [x, weight, bias], {"epsilon": _check_epsilon(epsilon)}, name=name)


def qk_norm(g: GraphEmitter, x_BHSD: ir.Value, weight_D: ir.Value, *, epsilon: float, name: str):
    """Emit QK-norm: ``RMSNorm`` of queries or keys ``[B, H, S, D]`` over head_dim, weight [D]."""
    if x_BHSD.shape is not None and len(x_BHSD.shape) != 4:
        raise ValueError(f"qk_norm input must have rank 4 [B, H, S, D], got {x_BHSD.shape}")
    return rms_norm(g, x_BHSD, weight_D, epsilon=epsilon, name=name)
