"""A paged KV cache: the read through a block table, and the mask from per-row lengths.

The pool of one layer is ``[N, Hkv, bs, D]``: ``N`` blocks of ``bs`` slots. Row ``b`` of a
batch owns the blocks ``block_table[b] [M]`` in logical order, so its logical cache position
``j`` lives in slot ``j % bs`` of block ``block_table[b, j // bs]``. :func:`PagedKV` gathers
a row's blocks into the contiguous ``[B, Hkv, M·bs, D]`` the attention block concatenates its
new keys to (entries past a row's length hold whatever block the table names; the mask drops
them).

Lengths per row instead of one shape-derived length: ``past_lengths [B]`` (tokens of row
``b`` already in the pool) and ``query_lengths [B]`` (its real new tokens, the last ones of
the ``S`` new slots: left padding). With ``P = M·bs`` and ``pad_b = S − query_lengths[b]``,
:func:`PagedKeep` keeps key ``t`` of ``T = P + S`` for query ``i`` when

- the key is real: ``t < past_lengths[b]`` (a pool slot) or ``t − P ≥ pad_b`` (a new token),
- and the position rule of :mod:`graphattn.ops.masks` holds on *logical* positions: a pool
  key sits at ``t``, a new key ``s = t − P`` at ``past_lengths[b] + s − pad_b``, query ``i``
  at ``past_lengths[b] + i − pad_b`` (``causal``: key at or before the query; ``window = W``:
  fewer than W positions apart).

A pad query keeps at most a few pool keys (or none: its row of the bias is then all
MASKED_BIAS, still finite); its output is never read.
"""

import onnx_ir as ir
from onnxscript import INT64

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.masks import KeepToBias, _check_window

# larger than any distance of two positions (the "no window" and "not causal" limits)
_FAR = 1 << 40


@graphattn_function
def PagedKV(pool_NKbD, block_table_BM):
    """``[B, Hkv, M·bs, D]``: row b's blocks ``block_table[b]`` of ``pool [N, Hkv, bs, D]``,
    in table order. One GatherND of the ``(block, head)`` pairs ``[B, Hkv, M, 2]``: a single
    copy of ``bs·D`` runs (Gather then Transpose copies twice, measured ~20% slower)."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    batch_1 = op.Shape(block_table_BM, start=0, end=1)
    heads_1 = op.Shape(pool_NKbD, start=1, end=2)
    width_1 = op.Shape(block_table_BM, start=1, end=2)
    grid = op.Concat(batch_1, heads_1, width_1, axis=0)
    blocks_BKM = op.Expand(op.Unsqueeze(block_table_BM, [1]), grid)
    heads_BKM = op.Expand(op.Unsqueeze(op.Range(zero, op.Squeeze(heads_1), one), [0, 2]), grid)
    pairs_BKM2 = op.Concat(op.Unsqueeze(blocks_BKM, [3]), op.Unsqueeze(heads_BKM, [3]), axis=3)
    gathered_BKMbD = op.GatherND(pool_NKbD, pairs_BKM2)
    head_dim_1 = op.Shape(pool_NKbD, start=3, end=4)
    shape = op.Concat(batch_1, heads_1, op.Constant(value_ints=[-1]), head_dim_1, axis=0)
    return op.Reshape(gathered_BKMbD, shape)


@graphattn_function
def PagedKeep(
    past_lengths_B, query_lengths_B, input_ids_BS, block_table_BM, causal: int, window: int,
    block_size: int,
):  # fmt: skip
    """keep ``[B, S, P + S]`` bool (``P = M·block_size``) from the per-row lengths (int64
    ``[B]``), ``input_ids [B, S]`` (its dim 1 is S) and ``block_table [B, M]`` (its dim 1 is
    M). See the module docstring for the rule."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    query_len = op.Squeeze(op.Shape(input_ids_BS, start=1, end=2))
    blocks = op.Squeeze(op.Shape(block_table_BM, start=1, end=2))
    pool_len = op.Mul(blocks, op.Cast(block_size, to=INT64.dtype))
    past_B1 = op.Unsqueeze(past_lengths_B, [1])
    pad_B1 = op.Sub(query_len, op.Unsqueeze(query_lengths_B, [1]))
    slots_1S = op.Unsqueeze(op.Range(zero, query_len, one), [0])
    # logical positions of the new tokens (queries and new keys alike)
    new_pos_BS = op.Sub(op.Add(past_B1, slots_1S), pad_B1)
    pool_pos_1P = op.Unsqueeze(op.Range(zero, pool_len, one), [0])
    batch_1 = op.Shape(past_lengths_B)
    pool_pos_BP = op.Expand(pool_pos_1P, op.Concat(batch_1, op.Unsqueeze(pool_len, [0]), axis=0))
    key_pos_BT = op.Concat(pool_pos_BP, new_pos_BS, axis=1)
    real_pool_BP = op.Less(pool_pos_BP, past_B1)
    real_new_BS = op.GreaterOrEqual(op.Expand(slots_1S, op.Shape(new_pos_BS)), pad_B1)
    real_BT = op.Concat(real_pool_BP, real_new_BS, axis=1)
    distance_BST = op.Sub(op.Unsqueeze(new_pos_BS, [2]), op.Unsqueeze(key_pos_BT, [1]))
    # causal=1: distance >= 0; causal=0: distance >= -FAR, which always holds.
    far = op.Constant(value_int=_FAR)
    lowest = op.Mul(op.Sub(op.Cast(causal, to=INT64.dtype), one), far)
    in_order_BST = op.GreaterOrEqual(distance_BST, lowest)
    window_i64 = op.Cast(window, to=INT64.dtype)
    limit = op.Where(op.Greater(window_i64, zero), window_i64, far)
    in_window_BST = op.Less(op.Abs(distance_BST), limit)
    keep_BST = op.And(in_order_BST, in_window_BST)
    return op.And(keep_BST, op.Unsqueeze(real_BT, [1]))


@graphattn_function
def PagedAttentionBias(
    past_lengths_B, query_lengths_B, input_ids_BS, block_table_BM, causal: int, window: int,
    block_size: int,
):  # fmt: skip
    """bias ``[B, 1, S, M·block_size + S]`` float32: 0 where :func:`PagedKeep` keeps the
    key, MASKED_BIAS elsewhere."""
    keep_BST = PagedKeep(
        past_lengths_B, query_lengths_B, input_ids_BS, block_table_BM,
        causal=causal, window=window, block_size=block_size,
    )  # fmt: skip
    return KeepToBias(op.Unsqueeze(keep_BST, [1]))


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"kv_block_size must be an int >= 1, got {block_size!r}")
    return block_size


def paged_kv(g: GraphEmitter, pool_NKbD: ir.Value, block_table_BM: ir.Value, *, name: str):
    """Emit ``PagedKV``: ``[B, Hkv, M·bs, D]`` from a pool and a block table."""
    require_rank(pool_NKbD, 4, "pool")
    require_rank(block_table_BM, 2, "block_table")
    return g.call(PagedKV, [pool_NKbD, block_table_BM], name=name)


def paged_attention_bias(
    g: GraphEmitter,
    past_lengths_B: ir.Value,
    query_lengths_B: ir.Value,
    input_ids_BS: ir.Value,
    block_table_BM: ir.Value,
    *,
    block_size: int,
    causal: bool = True,
    window: int | None = None,
    name: str = "paged_bias",
) -> ir.Value:
    """Emit ``PagedAttentionBias``: bias ``[B, 1, S, M·block_size + S]`` float32."""
    require_rank(past_lengths_B, 1, "past_lengths")
    require_rank(query_lengths_B, 1, "query_lengths")
    require_rank(input_ids_BS, 2, "input_ids")
    require_rank(block_table_BM, 2, "block_table")
    attributes = {
        "causal": int(bool(causal)),
        "window": _check_window(window),
        "block_size": _check_block_size(block_size),
    }
    inputs = [past_lengths_B, query_lengths_B, input_ids_BS, block_table_BM]
    return g.call(PagedAttentionBias, inputs, attributes, name=name)


__all__ = ["paged_attention_bias", "paged_kv"]
