"""Masks: turn positions and an ``attention_mask`` into the additive bias attention takes.

Convention: a bias is float32 ``[batch or 1, 1, query_len S, key_len T]``, 0 where a query may
attend a key and ``MASKED_BIAS`` (-65504) where it may not. Query ``i`` of ``S`` sits at absolute
position ``T - S + i`` (the new tokens follow the past). With ``causal`` a query sees keys at or
before its position; ``window = W > 0`` further keeps only keys less than W positions away (the
last W positions, itself included, when causal; ``|q - k| < W`` when bidirectional).
"""

import onnx_ir as ir
from onnxscript import BOOL, FLOAT, INT64

from graphattn.ops.domain import DROPPED_BELOW, MASKED_BIAS, graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank


@graphattn_function
def PositionKeep(query_len, key_len, causal: int, window: int):
    """keep [S, T] bool from scalar int64 lengths S and T (see module docstring for the rule)."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    key_pos_T = op.Range(zero, key_len, one)
    query_pos_S = op.Range(op.Sub(key_len, query_len), key_len, one)
    distance_ST = op.Sub(op.Unsqueeze(query_pos_S, [1]), op.Unsqueeze(key_pos_T, [0]))
    # causal=1: distance >= 0; causal=0: distance >= -T, which always holds.
    causal_i64 = op.Cast(causal, to=INT64.dtype)
    lowest_distance = op.Mul(op.Sub(causal_i64, one), key_len)
    in_order_ST = op.GreaterOrEqual(distance_ST, lowest_distance)
    # window=0 means no window: the limit T + 1 is never reached.
    window_i64 = op.Cast(window, to=INT64.dtype)
    limit = op.Where(op.Greater(window_i64, zero), window_i64, op.Add(key_len, one))
    in_window_ST = op.Less(op.Abs(distance_ST), limit)
    return op.And(in_order_ST, in_window_ST)


@graphattn_function
def KeepToBias(keep):
    """bias (float32, shape of ``keep``): 0 where keep is true, MASKED_BIAS elsewhere."""
    zero = op.Constant(value_float=0.0)
    masked = op.Constant(value_float=MASKED_BIAS)
    return op.Where(keep, zero, masked)


@graphattn_function
def BiasToKeep(bias):
    """keep (bool, shape of ``bias``): true where an additive bias does not drop the key."""
    return op.Greater(bias, op.CastLike(op.Constant(value_float=DROPPED_BELOW), bias))


@graphattn_function
def PositionBias(query_BHSD, key_BKTD, causal: int, window: int):
    """bias [1, 1, S, T] float32 from positions alone (no padding), S and T read from shapes."""
    query_len = op.Squeeze(op.Slice(op.Shape(query_BHSD), [2], [3]))
    key_len = op.Squeeze(op.Slice(op.Shape(key_BKTD), [2], [3]))
    keep_ST = PositionKeep(query_len, key_len, causal=causal, window=window)
    return KeepToBias(op.Unsqueeze(keep_ST, [0, 1]))


@graphattn_function
def AttentionBias(attention_mask_BT, input_ids_BS, causal: int, window: int):
    """bias [B, 1, S, T] float32 from an int64 ``attention_mask [B, T]`` (1 = token, 0 = pad).

    ``input_ids [B, S]`` (any tensor whose dim 1 is the new length S) gives the query length.
    Left and right padding both work: padded keys are dropped for every query.
    """
    query_len = op.Squeeze(op.Slice(op.Shape(input_ids_BS), [1], [2]))
    key_len = op.Squeeze(op.Slice(op.Shape(attention_mask_BT), [1], [2]))
    keep_ST = PositionKeep(query_len, key_len, causal=causal, window=window)
    token_B11T = op.Unsqueeze(op.Cast(attention_mask_BT, to=BOOL.dtype), [1, 2])
    keep_B1ST = op.And(op.Unsqueeze(keep_ST, [0, 1]), token_B11T)
    return KeepToBias(keep_B1ST)


@graphattn_function
def PositionIds(attention_mask_BT, input_ids_BS):
    """position_ids [B, S] int64: each token's index among the real tokens of its row.

    Computed as (cumsum(attention_mask) - 1) * attention_mask over the last S columns: pads get
    0, and a left-padded row gets the same positions as the row alone.
    """
    cumulative_BT = op.CumSum(attention_mask_BT, op.Constant(value_int=1))
    positions_BT = op.Mul(op.Sub(cumulative_BT, op.Constant(value_int=1)), attention_mask_BT)
    query_len = op.Slice(op.Shape(input_ids_BS), [1], [2])
    return op.Slice(positions_BT, op.Neg(query_len), [9223372036854775807], [1])


@graphattn_function
def AlibiBias(attention_mask_BT, slopes_H):
    """ALiBi bias [B, H, 1, T] float32: ``slope_h · position_t`` with ``position_t`` the key's
    index among the row's real tokens (pads get 0: they are masked anyway). A bias that
    differs from another ALiBi convention by a constant per query gives the same softmax."""
    cumulative_BT = op.CumSum(attention_mask_BT, op.Constant(value_int=1))
    positions_BT = op.Mul(op.Sub(cumulative_BT, op.Constant(value_int=1)), attention_mask_BT)
    positions_B11T = op.Unsqueeze(op.Cast(positions_BT, to=1), [1, 2])
    slopes_1H11 = op.Unsqueeze(op.Cast(slopes_H, to=1), [0, 2, 3])
    return op.Mul(slopes_1H11, positions_B11T)


def _check_window(window: int | None) -> int:
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    return window


def attention_bias(
    g: GraphEmitter,
    attention_mask_BT: ir.Value,
    input_ids_BS: ir.Value,
    *,
    causal: bool = True,
    window: int | None = None,
    name: str = "attention_bias",
) -> ir.Value:
    """Emit ``AttentionBias``: bias [B, 1, S, T] float32 from ``attention_mask [B, T]`` int64."""
    require_rank(attention_mask_BT, 2, "attention_mask")
    require_rank(input_ids_BS, 2, "input_ids")
    attributes = {"causal": int(bool(causal)), "window": _check_window(window)}
    return g.call(AttentionBias, [attention_mask_BT, input_ids_BS], attributes, name=name)


def position_bias(
    g: GraphEmitter,
    query_BHSD: ir.Value,
    key_BKTD: ir.Value,
    *,
    causal: bool = True,
    window: int | None = None,
    name: str = "position_bias",
) -> ir.Value:
    """Emit ``PositionBias``: bias [1, 1, S, T] float32 for queries/keys without padding."""
    attributes = {"causal": int(bool(causal)), "window": _check_window(window)}
    return g.call(PositionBias, [query_BHSD, key_BKTD], attributes, name=name)


def position_ids_from_mask(
    g: GraphEmitter, attention_mask_BT: ir.Value, input_ids_BS: ir.Value, *, name: str
) -> ir.Value:
    """Emit ``PositionIds``: position_ids [B, S] int64 from ``attention_mask [B, T]``."""
    require_rank(attention_mask_BT, 2, "attention_mask")
    return g.call(PositionIds, [attention_mask_BT, input_ids_BS], name=name)


def alibi_bias(
    g: GraphEmitter, attention_mask_BT: ir.Value, slopes_H: ir.Value, *, name: str
) -> ir.Value:
    """Emit ``AlibiBias``: [B, H, 1, T] float32 from ``attention_mask`` and slopes ``[H]``."""
    require_rank(attention_mask_BT, 2, "attention_mask")
    return g.call(AlibiBias, [attention_mask_BT, slopes_H], name=name)


def bool_mask_to_bias(g: GraphEmitter, keep: ir.Value, *, name: str) -> ir.Value:
    """Emit ``KeepToBias``: a boolean keep-mask as an additive float32 bias of the same shape."""
    return g.call(KeepToBias, [keep], name=name)


__all__ = [
    "FLOAT",
    "alibi_bias",
    "attention_bias",
    "bool_mask_to_bias",
    "position_bias",
    "position_ids_from_mask",
]
