"""Encoder pieces: the bidirectional padding mask and the pooled sentence embedding.

``bidirectional_bias``: bias ``[B, 1, S, S]`` float32 from ``attention_mask [B, S]`` int64,
0 where key ``t`` is a real token (and, with ``window = W``, ``|s - t| < W``), ``MASKED_BIAS``
elsewhere: every query attends every real key of its row, before or after it. A padded query
still attends the real keys (its output is defined, and ignored by the pooling).

``MeanPoolNormalize``: ``sentence_embedding [B, C] = m / max(||m||₂, epsilon)`` with
``m = Σ_s mask[b, s] · hidden[b, s, :] / max(Σ_s mask[b, s], 1e-9)``, float32 statistics:
the mean over the row's real tokens, L2-normalized (sentence-transformers' ``Pooling(mean)``
followed by ``Normalize``).
"""

import onnx_ir as ir

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.masks import attention_bias

MIN_TOKENS = 1e-9  # sentence-transformers clamps the token count the same way


@graphattn_function
def MaskedMeanPool(hidden_BSC, attention_mask_BS):
    """mean [B, C] (float32) of ``hidden [B, S, C]`` over the positions where mask is 1."""
    mask_BS1 = op.Unsqueeze(op.Cast(attention_mask_BS, to=1), [2])
    summed_BC = op.ReduceSum(op.Mul(op.Cast(hidden_BSC, to=1), mask_BS1), [1], keepdims=0)
    count_B1 = op.ReduceSum(mask_BS1, [1], keepdims=0)
    return op.Div(summed_BC, op.Max(count_B1, op.Constant(value_float=MIN_TOKENS)))


@graphattn_function
def L2Normalize(x_BC, epsilon: float):
    """y [B, C] (float32) = x / max(||x||₂ over C, epsilon)."""
    x_f32 = op.Cast(x_BC, to=1)
    norm_B1 = op.Sqrt(op.ReduceSum(op.Mul(x_f32, x_f32), [-1], keepdims=1))
    return op.Div(x_f32, op.Max(norm_B1, op.Constant(value_float=epsilon)))


@graphattn_function
def MeanPoolNormalize(hidden_BSC, attention_mask_BS, epsilon: float):
    """sentence_embedding [B, C] in hidden's type: the masked mean, L2-normalized."""
    pooled_BC = MaskedMeanPool(hidden_BSC, attention_mask_BS)
    return op.CastLike(L2Normalize(pooled_BC, epsilon=epsilon), hidden_BSC)


def bidirectional_bias(
    g: GraphEmitter,
    attention_mask_BS: ir.Value,
    *,
    window: int | None = None,
    name: str = "encoder_bias",
) -> ir.Value:
    """Emit the encoder's attention bias ``[B, 1, S, S]`` float32 (see module docstring)."""
    require_rank(attention_mask_BS, 2, "attention_mask")
    return attention_bias(
        g, attention_mask_BS, attention_mask_BS, causal=False, window=window, name=name
    )


def sentence_embedding(
    g: GraphEmitter,
    hidden_BSC: ir.Value,
    attention_mask_BS: ir.Value,
    *,
    epsilon: float = 1e-12,
    name: str = "sentence_embedding",
) -> ir.Value:
    """Emit ``MeanPoolNormalize``: ``[B, C]`` from ``hidden [B, S, C]`` and ``mask [B, S]``."""
    require_rank(hidden_BSC, 3, "hidden")
    require_rank(attention_mask_BS, 2, "attention_mask")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    return g.call(
        MeanPoolNormalize,
        [hidden_BSC, attention_mask_BS],
        {"epsilon": float(epsilon)},
        name=name,
    )
