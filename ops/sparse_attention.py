"""Sparse attention: native sparse attention (NSA) and sparse routed attention, in standard ops.

Layouts: query ``[B, H, S, D]``; key/value ``[B, Hkv, T, D]`` (the past already appended, so
T = P + S); ``attention_mask [B, T]`` int64 (1 = token, 0 = pad). Query ``i`` sits at slot
``T - S + i``. Query head ``h`` reads KV head ``h // G`` (``G = H / Hkv``). Selections are
made per query head (attribute ``shared = 0``) or once per KV head for its G query heads,
ranked by the sum of their scores (``shared = 1``, the emitters' ``selection="group"``: each
chosen key is then gathered once per KV head, as NSA's GQA kernels share their selection).

**Blocks** (NSA's coarse blocks of ``L = block_size`` tokens, routed attention's segments of
``L = segment_size``) are counted from each row's first real token: a key at slot ``t`` has
relative position ``r = t - start`` (``start`` = first slot whose mask is 1) and lies in block
``r // L``. A left-padded row therefore has the same blocks as the row alone. The causal rules:

- a query sees a key iff the key is real (mask 1) and at or before the query's slot;
- a block is a *candidate* for a query iff it holds at least one key the query sees: blocks
  after the query's own block are never chosen; the query's own block is partially masked —
  its mean key (NSA) or centroid (routed) is taken over the keys at or before the query only,
  so a prefill gives exactly what decoding token by token gives;
- a query with fewer than ``c`` (``f``, ``k``) candidates takes all it has; selections beyond
  are dropped (TopK runs on ``min(c, blocks)`` with non-candidates scored ``-3e38``).

**NativeSparseAttention** (query and key already rotated, as in a standard layer)::

    coarse: mean_n = mean of the visible keys of block n; score_n = scale · q · mean_n;
            O_c = softmax over the visible keys of the top-c blocks, at full resolution
    fine:   O_f = softmax over the top-f visible keys by scale · q · k (TopK of those scores)
    window: O_w = softmax over the visible keys at most W - 1 slots before the query
    output  = σ(g_c) O_c + σ(g_f) O_f + σ(g_w) O_w

The gates are learned logits per query head (the seed's ``gate_coarse/fine/window [H]``,
initialised to 0 so each path weighs 0.5); the function takes any gate broadcastable to
``[B, H, S, 1]``, so per-token gates ``[B, S, H]`` from a projection work too (the emitter
reshapes either form).

**SparseRoutedAttention** (query and key *before* RoPE; ``cos/sin [B, T, R]`` for every slot)::

    centroid_n = mean of the visible (un-rotated) keys of segment n
    route_n    = q · centroid_n / (max(|q|, 1e-12) · max(|centroid_n|, 1e-12))   (cosine)
    output     = softmax over the visible keys of the top-k segments of
                 scale · RoPE(q, pos_q) · RoPE(k_t, pos_t),  mixing the values v_t

RoPE is split halves or interleaved on the first ``2R`` channels, each key rotated at its own
slot's cos/sin (document-wise positions work: the tables carry whatever positions the caller
computed). Its KV cache therefore holds keys *before* RoPE.

**Decode with a KV cache**: the caches are the plain keys/values; nothing else is cached. Each
step recomputes the block summaries from the cached keys: every cached key is gathered into
block order once (a Gather of T rows per KV head) and summed per block by a MatMul with 0/1
weights (pads drop out there); the query's own block is re-summed by a CumSum over just the
blocks that hold queries (one block when decoding). The fine path scores every cached key
(O(T · D) per query head) and TopKs over T. So a step is never cheaper than one pass over the
cache; what the sparse forms save is the softmax and the value mix (``c · L``, ``f``, ``k · L``
or ``W`` keys instead of T), paid for by gathering the selected keys/values once per query
head (G times what a dense GQA step reads per key) or, shared, once per KV head.

**Prefill** (S > 1) takes a second, equal form of the coarse/routed attention: the chosen
blocks become a keep-mask over the whole cache (ScatterElements into a per-query block table,
GatherElements by each key's block), so its memory is O(S · T) scores as in dense attention
rather than O(S · c · L · D) copied keys; routed prefill rotates every key once. Both forms sit
in the graph and split the queries between them (all to one, none to the other: a
zero-length tensor costs nothing), since onnxruntime cannot type an ``If`` inside a function.
"""

import math

import numpy as np
import onnx_ir as ir
from onnxscript import BOOL, FLOAT, INT64
from onnxscript.values import OnnxFunction

from graphattn.ops.attention import MaskedSoftmaxMix, _check_heads, _check_positive
from graphattn.ops.domain import MASKED_BIAS, graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.masks import KeepToBias

# Score of a block/key that may not be chosen: below any real score, so TopK ranks it last;
# anything chosen at or below NOT_CHOSEN_BELOW is dropped afterwards.
NOT_CANDIDATE = -1.0e30
NOT_CHOSEN_BELOW = -1.0e29
COSINE_EPSILON = 1e-12


@graphattn_function
def SparseRowStart(attention_mask_BT):
    """start [B, 1] int64: the first slot of each row whose mask is 1 (0 for a row of pads)."""
    return op.ArgMax(op.Cast(attention_mask_BT, to=FLOAT.dtype), axis=1, keepdims=1)


@graphattn_function
def BlockRealKeys(attention_mask_BT, block_size: int):
    """real [B, N·L] bool: whether relative position r (slot start + r) holds a real key;
    N = ceil(T / L) blocks, L = block_size."""
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    total = op.Slice(op.Shape(attention_mask_BT), [1], [2])
    blocks = op.Div(op.Sub(op.Add(total, block), [1]), block)
    rel_R = op.Range(
        op.Constant(value_int=0), op.Squeeze(op.Mul(blocks, block)), op.Constant(value_int=1)
    )
    slot_BR = op.Add(op.Unsqueeze(rel_R, [0]), SparseRowStart(attention_mask_BT))
    in_range_BR = op.Less(slot_BR, total)
    clamped_BR = op.Min(slot_BR, op.Sub(total, [1]))
    token_BR = op.Cast(op.GatherElements(attention_mask_BT, clamped_BR, axis=1), to=BOOL.dtype)
    return op.And(in_range_BR, token_BR)


@graphattn_function
def QueryRelative(query_BHSD, attention_mask_BT):
    """rel [B, S] int64: each query's relative position ``T - S + i - start`` (< 0: a pad)."""
    total = op.Squeeze(op.Slice(op.Shape(attention_mask_BT), [1], [2]))
    length = op.Squeeze(op.Slice(op.Shape(query_BHSD), [2], [3]))
    slots_S = op.Range(op.Sub(total, length), total, op.Constant(value_int=1))
    return op.Sub(op.Unsqueeze(slots_S, [0]), SparseRowStart(attention_mask_BT))


@graphattn_function
def RelativeKeys(key_BKTD, attention_mask_BT, rel_BU):
    """keys [B, Hkv, U, D] at slots ``start + rel`` (clamped into the cache; the caller
    masks what :func:`RelativeReal` says is not a real key)."""
    shape = op.Shape(key_BKTD)
    batch = op.Slice(shape, [0], [1])
    heads = op.Slice(shape, [1], [2])
    total = op.Slice(shape, [2], [3])
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    slot_BU = op.Add(rel_BU, SparseRowStart(attention_mask_BT))
    slot_BU = op.Max(op.Min(slot_BU, op.Sub(total, [1])), zero)
    row_B11 = op.Unsqueeze(op.Range(zero, op.Squeeze(batch), one), [1, 2])
    head_1K1 = op.Unsqueeze(op.Range(zero, op.Squeeze(heads), one), [0, 2])
    flat_BKU = op.Add(
        op.Mul(op.Add(op.Mul(row_B11, heads), head_1K1), total), op.Unsqueeze(slot_BU, [1])
    )
    rows = op.Reshape(key_BKTD, op.Concat([-1], op.Slice(shape, [3], [4]), axis=0), allowzero=1)
    return op.Gather(rows, flat_BKU, axis=0)


@graphattn_function
def RelativeReal(attention_mask_BT, rel_BU):
    """real [B, U] bool: whether slot ``start + rel`` exists, holds a token, and rel >= 0."""
    total = op.Slice(op.Shape(attention_mask_BT), [1], [2])
    zero = op.Constant(value_int=0)
    slot_BU = op.Add(rel_BU, SparseRowStart(attention_mask_BT))
    inside = op.And(op.Less(slot_BU, total), op.GreaterOrEqual(rel_BU, zero))
    clamped = op.Max(op.Min(slot_BU, op.Sub(total, [1])), zero)
    token = op.Cast(op.GatherElements(attention_mask_BT, clamped, axis=1), to=BOOL.dtype)
    return op.And(inside, token)


@graphattn_function
def BlockSums(key_BKTD, attention_mask_BT, block_size: int):
    """sums [B, Hkv, N, D]: the sum of the real keys of every block (N = ceil(T / L)); the
    keys are gathered into block order once and summed by a MatMul with the 0/1 weights."""
    shape = op.Shape(key_BKTD)
    batch = op.Slice(shape, [0], [1])
    heads = op.Slice(shape, [1], [2])
    total = op.Slice(shape, [2], [3])
    dim = op.Slice(shape, [3], [4])
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    blocks = op.Div(op.Sub(op.Add(total, block), [1]), block)
    rel_1R = op.Unsqueeze(
        op.Range(
            op.Constant(value_int=0), op.Squeeze(op.Mul(blocks, block)), op.Constant(value_int=1)
        ),
        [0],
    )
    rel_BR = op.Expand(rel_1R, op.Concat(batch, [1], axis=0))
    keys = op.Reshape(
        RelativeKeys(key_BKTD, attention_mask_BT, rel_BR),
        op.Concat(batch, heads, blocks, block, dim, axis=0),
        allowzero=1,
    )
    real = op.CastLike(RelativeReal(attention_mask_BT, rel_BR), key_BKTD)
    weights_B1N1L = op.Reshape(real, op.Concat(batch, [1], blocks, [1], block, axis=0), allowzero=1)
    return op.Squeeze(op.MatMul(weights_B1N1L, keys), [3])


@graphattn_function
def OwnBlockSums(key_BKTD, attention_mask_BT, query_BHSD, block_size: int):
    """sums [B, Hkv, S, D]: for each query, the sum of the real keys of its own block at or
    before it. Only the blocks that hold queries are read: ``ceil((S + L - 1) / L)`` blocks
    from the first query's block (one block when decoding)."""
    shape = op.Shape(key_BKTD)
    batch = op.Slice(shape, [0], [1])
    heads = op.Slice(shape, [1], [2])
    dim = op.Slice(shape, [3], [4])
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    length = op.Slice(op.Shape(query_BHSD), [2], [3])
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    at_BS = op.Max(QueryRelative(query_BHSD, attention_mask_BT), zero)
    first_B1 = op.Mul(op.Div(op.ReduceMin(at_BS, [1], keepdims=1), block), block)
    blocks = op.Div(op.Sub(op.Add(length, op.Add(block, block)), [2]), block)
    span = op.Mul(blocks, block)
    rel_BU = op.Add(first_B1, op.Unsqueeze(op.Range(zero, op.Squeeze(span), one), [0]))
    keys_BKUD = RelativeKeys(key_BKTD, attention_mask_BT, rel_BU)
    real_B1U1 = op.Unsqueeze(op.CastLike(RelativeReal(attention_mask_BT, rel_BU), key_BKTD), [1, 3])
    blocked = op.Reshape(
        op.Mul(keys_BKUD, real_B1U1),
        op.Concat(batch, heads, blocks, block, dim, axis=0),
        allowzero=1,
    )
    prefix = op.Reshape(
        op.CumSum(blocked, op.Constant(value_int=3)),
        op.Concat(batch, heads, span, dim, axis=0),
        allowzero=1,
    )
    offset_BS = op.Sub(at_BS, first_B1)
    row_B11 = op.Unsqueeze(op.Range(zero, op.Squeeze(batch), one), [1, 2])
    head_1K1 = op.Unsqueeze(op.Range(zero, op.Squeeze(heads), one), [0, 2])
    flat_BKS = op.Add(
        op.Mul(op.Add(op.Mul(row_B11, heads), head_1K1), span), op.Unsqueeze(offset_BS, [1])
    )
    return op.Gather(
        op.Reshape(prefix, op.Concat([-1], dim, axis=0), allowzero=1), flat_BKS, axis=0
    )


@graphattn_function
def BlockPrefixCounts(attention_mask_BT, block_size: int):
    """counts [B, N·L] float32: the real keys at relative positions ``(r // L)·L .. r``."""
    real_BR = BlockRealKeys(attention_mask_BT, block_size=block_size)
    shape = op.Shape(real_BR)
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    blocked = op.Concat(op.Slice(shape, [0], [1]), [-1], block, axis=0)
    counts = op.CumSum(
        op.Reshape(op.Cast(real_BR, to=FLOAT.dtype), blocked, allowzero=1), op.Constant(value_int=2)
    )
    return op.Reshape(counts, shape, allowzero=1)


@graphattn_function
def CausalBlockScores(
    query_BHSD, key_BKTD, attention_mask_BT, block_size: int, scale: float, cosine: int
):
    """scores [B, Hkv, G, S, N] of every block for every query head, non-candidates at -3e38.

    ``cosine = 0``: ``scale · q · mean`` (NSA); ``cosine = 1``: ``q · c / (|q| |c|)`` (routing).
    The query's own block uses the mean of its keys at or before the query."""
    full_sum_BKND = BlockSums(key_BKTD, attention_mask_BT, block_size=block_size)
    own_sum_BKSD = OwnBlockSums(key_BKTD, attention_mask_BT, query_BHSD, block_size=block_size)
    counts_BR = BlockPrefixCounts(attention_mask_BT, block_size=block_size)
    key_shape = op.Shape(key_BKTD)
    batch = op.Slice(key_shape, [0], [1])
    heads = op.Slice(key_shape, [1], [2])
    padded = op.Slice(op.Shape(counts_BR), [1], [2])
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    blocks = op.Div(padded, block)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    counts_BNL = op.Reshape(counts_BR, op.Concat(batch, blocks, block, axis=0), allowzero=1)
    full_count_BN = op.Squeeze(op.Slice(counts_BNL, [-1], [9223372036854775807], [2]), [2])
    rel_BS = QueryRelative(query_BHSD, attention_mask_BT)
    at_BS = op.Max(rel_BS, zero)
    own_count_BS = op.GatherElements(counts_BR, at_BS, axis=1)
    # means: divided only here, on the small tensors
    unit = op.CastLike(op.Constant(value_float=1.0), query_BHSD)
    full_divisor = op.Unsqueeze(op.Max(op.CastLike(full_count_BN, query_BHSD), unit), [1, 3])
    full_BKND = op.Div(full_sum_BKND, full_divisor)
    own_divisor = op.Unsqueeze(op.Max(op.CastLike(own_count_BS, query_BHSD), unit), [1, 3])
    own_BKSD = op.Div(own_sum_BKSD, own_divisor)
    # dot products, query heads grouped per KV head
    query_shape = op.Shape(query_BHSD)
    grouped = op.Concat(batch, heads, [-1], op.Slice(query_shape, [2], [4]), axis=0)
    query_BKGSD = op.Reshape(query_BHSD, grouped, allowzero=1)
    full_dot = op.MatMul(query_BKGSD, op.Unsqueeze(op.Transpose(full_BKND, perm=[0, 1, 3, 2]), [2]))
    own_dot = op.ReduceSum(op.Mul(query_BKGSD, op.Unsqueeze(own_BKSD, [2])), [-1], keepdims=1)
    # normalisers: cosine divides by the norms, the dot product by 1 / scale
    use_cosine = op.Greater(op.Cast(cosine, to=INT64.dtype), zero)
    epsilon = op.CastLike(op.Constant(value_float=COSINE_EPSILON), query_BHSD)
    inverse_scale = op.Div(unit, op.CastLike(scale, query_BHSD))
    query_norm = op.Max(op.ReduceL2(query_BKGSD, [-1], keepdims=1), epsilon)
    query_norm = op.Where(use_cosine, query_norm, inverse_scale)
    full_norm = op.Max(op.ReduceL2(full_BKND, [-1], keepdims=0), epsilon)
    full_norm = op.Unsqueeze(op.Where(use_cosine, full_norm, unit), [2, 3])
    own_norm = op.Max(op.ReduceL2(own_BKSD, [-1], keepdims=1), epsilon)
    own_norm = op.Unsqueeze(op.Where(use_cosine, own_norm, unit), [2])
    full_score = op.Div(full_dot, op.Mul(query_norm, full_norm))
    own_score = op.Div(own_dot, op.Mul(query_norm, own_norm))
    # candidates: blocks before the query's own, and its own; each with a visible key
    current_B11S1 = op.Unsqueeze(op.Div(at_BS, block), [1, 2, 4])
    index_N = op.Range(zero, op.Squeeze(blocks), one)
    is_own = op.Equal(index_N, current_B11S1)
    is_before = op.Less(index_N, current_B11S1)
    count = op.Where(
        is_own, op.Unsqueeze(own_count_BS, [1, 2, 4]), op.Unsqueeze(full_count_BN, [1, 2, 3])
    )
    has_keys = op.Greater(count, op.Constant(value_float=0.0))
    real_query = op.Unsqueeze(op.GreaterOrEqual(rel_BS, zero), [1, 2, 4])
    candidate = op.And(op.And(op.Or(is_own, is_before), has_keys), real_query)
    score = op.Where(is_own, own_score, full_score)
    return op.Where(candidate, score, op.CastLike(op.Constant(value_float=NOT_CANDIDATE), score))


@graphattn_function
def GroupScores(scores_BKGSX, shared: int):
    """``shared = 0``: the scores as they are; ``1``: summed over the G query heads of each
    KV head, ``[B, Hkv, 1, S, X]`` (one selection per KV head, as NSA's GQA kernels share)."""
    axes = op.Slice([2], [0], op.Reshape(op.Cast(shared, to=INT64.dtype), [1], allowzero=1))
    return op.ReduceSum(scores_BKGSX, axes, keepdims=1, noop_with_empty_axes=1)


@graphattn_function
def ChooseTop(scores_BKGSN, top: int, shared: int):
    """chosen [B, Hkv, G or 1, S, min(top, N)] int64: the indices of the ``top`` best scores
    along the last axis (of the group's summed scores when ``shared``), best first, -1 where
    the choice was not a candidate."""
    scores_BKGSN = GroupScores(scores_BKGSN, shared=shared)
    top_1 = op.Reshape(op.Cast(top, to=INT64.dtype), [1], allowzero=1)
    count = op.Min(top_1, op.Slice(op.Shape(scores_BKGSN), [-1], [9223372036854775807]))
    values, indices = op.TopK(scores_BKGSN, count, axis=-1, largest=1, sorted=1)
    chosen = op.Greater(values, op.CastLike(op.Constant(value_float=NOT_CHOSEN_BELOW), values))
    return op.Where(chosen, indices, op.Constant(value_int=-1))


@graphattn_function
def SelectedBlockSlots(chosen_BKGSC, attention_mask_BT, block_size: int):
    """slots [B, Hkv, G, S, C·L] int64: the slots of every key of the chosen blocks, -1 for a
    key the query does not see (after the query, a pad, past T) or of a dropped choice."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    offsets_L = op.Range(zero, op.Squeeze(block), one)
    start_B1111 = op.Unsqueeze(SparseRowStart(attention_mask_BT), [2, 3, 4, 5])
    slots_BKGSCL = op.Add(
        op.Add(op.Unsqueeze(op.Mul(chosen_BKGSC, block), [5]), offsets_L), start_B1111
    )
    chosen_shape = op.Shape(chosen_BKGSC)  # no -1 in the reshapes: S may be 0 (see NsaCoarse)
    width = op.Mul(op.Slice(chosen_shape, [4], [5]), block)
    flat_shape = op.Concat(op.Slice(chosen_shape, [0], [4]), width, axis=0)
    slots = op.Reshape(slots_BKGSCL, flat_shape, allowzero=1)
    dropped = op.Reshape(
        op.Expand(op.Unsqueeze(op.Less(chosen_BKGSC, zero), [5]), op.Shape(slots_BKGSCL)),
        flat_shape,
        allowzero=1,
    )
    total = op.Slice(op.Shape(attention_mask_BT), [1], [2])
    length = op.Slice(chosen_shape, [3], [4])
    query_slot_S1 = op.Unsqueeze(
        op.Range(op.Squeeze(op.Sub(total, length)), op.Squeeze(total), one), [1]
    )
    in_order = op.LessOrEqual(slots, query_slot_S1)
    clamped = op.Max(op.Min(slots, op.Sub(total, [1])), zero)
    batch = op.Slice(chosen_shape, [0], [1])
    rest = op.Mul(
        op.Mul(op.Slice(flat_shape, [1], [2]), op.Slice(flat_shape, [2], [3])),
        op.Mul(op.Slice(flat_shape, [3], [4]), width),
    )
    token = op.GatherElements(
        attention_mask_BT, op.Reshape(clamped, op.Concat(batch, rest, axis=0), allowzero=1), axis=1
    )
    token = op.Reshape(op.Cast(token, to=BOOL.dtype), flat_shape, allowzero=1)
    visible = op.And(op.And(in_order, op.Less(slots, total)), op.And(token, op.Not(dropped)))
    return op.Where(visible, slots, op.Constant(value_int=-1))


@graphattn_function
def GatherSlots(data_BKTX, slots_BKGSM):
    """rows [B, Hkv, G, S, M, X] = data[b, k, slot] (data [B, Hkv or 1, T, X]; slot -1 reads
    slot 0, to be masked by the caller)."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    data_shape = op.Shape(data_BKTX)
    data_heads = op.Slice(data_shape, [1], [2])
    total = op.Slice(data_shape, [2], [3])
    slots_shape = op.Shape(slots_BKGSM)
    row_B = op.Range(zero, op.Squeeze(op.Slice(slots_shape, [0], [1])), one)
    head_K = op.Mod(op.Range(zero, op.Squeeze(op.Slice(slots_shape, [1], [2])), one), data_heads)
    base = op.Add(op.Mul(op.Unsqueeze(row_B, [1]), data_heads), op.Unsqueeze(head_K, [0]))
    flat = op.Add(op.Mul(op.Unsqueeze(base, [2, 3, 4]), total), op.Max(slots_BKGSM, zero))
    rows = op.Reshape(
        data_BKTX, op.Concat([-1], op.Slice(data_shape, [3], [4]), axis=0), allowzero=1
    )
    return op.Gather(rows, flat, axis=0)


@graphattn_function
def SelectedSoftmaxMix(scores_BKGSM, slots_BKGSM, values_BKGSMD):
    """output [B, H, S, D] = softmax over the selected keys (slot >= 0) of ``scores``, mixing
    the gathered values; a query with nothing selected gets a finite, meaningless row."""
    keep = op.GreaterOrEqual(slots_BKGSM, op.Constant(value_int=0))
    masked = op.Where(
        keep, scores_BKGSM, op.CastLike(op.Constant(value_float=MASKED_BIAS), scores_BKGSM)
    )
    probs_BKGS1M = op.Unsqueeze(op.Softmax(masked, axis=-1), [4])
    mixed_BKGS1D = op.MatMul(probs_BKGS1M, values_BKGSMD)
    shape = op.Shape(mixed_BKGS1D)
    heads = op.Mul(op.Slice(shape, [1], [2]), op.Slice(shape, [2], [3]))
    output_shape = op.Concat(
        op.Slice(shape, [0], [1]),
        heads,
        op.Slice(shape, [3], [4]),
        op.Slice(shape, [5], [6]),
        axis=0,
    )
    return op.Reshape(mixed_BKGS1D, output_shape, allowzero=1)


@graphattn_function
def SelectedAttention(query_BHSD, keys_BKGSMD, values_BKGSMD, slots_BKGSM, scale: float):
    """output [B, H, S, D] = softmax(scale · q · k over the selected keys) · v."""
    keys_shape = op.Shape(keys_BKGSMD)
    query_shape = op.Shape(query_BHSD)
    group = op.Div(op.Slice(query_shape, [1], [2]), op.Slice(keys_shape, [1], [2]))
    grouped = op.Concat(
        op.Slice(keys_shape, [0], [2]),
        group,
        op.Slice(query_shape, [2], [3]),
        [1],
        op.Slice(keys_shape, [5], [6]),
        axis=0,
    )
    query_BKGS1D = op.Reshape(
        op.Mul(query_BHSD, op.CastLike(scale, query_BHSD)), grouped, allowzero=1
    )
    scores = op.MatMul(query_BKGS1D, op.Transpose(keys_BKGSMD, perm=[0, 1, 2, 3, 5, 4]))
    return SelectedSoftmaxMix(op.Squeeze(scores, [4]), slots_BKGSM, values_BKGSMD)


@graphattn_function
def KeyScores(query_BHSD, key_BKTD, scale: float):
    """scores [B, Hkv, G, S, T] = scale · Q Kᵀ, query heads grouped per KV head; the key is
    unsqueezed before its transpose so that onnxruntime fuses Transpose + MatMul."""
    query_shape = op.Shape(query_BHSD)
    key_shape = op.Shape(key_BKTD)
    group = op.Div(op.Slice(query_shape, [1], [2]), op.Slice(key_shape, [1], [2]))
    grouped_shape = op.Concat(
        op.Slice(key_shape, [0], [2]), group, op.Slice(query_shape, [2], [4]), axis=0
    )
    query_BKGSD = op.Reshape(
        op.Mul(query_BHSD, op.CastLike(scale, query_BHSD)), grouped_shape, allowzero=1
    )
    key_BK1DT = op.Transpose(op.Unsqueeze(key_BKTD, [2]), perm=[0, 1, 2, 4, 3])
    return op.MatMul(query_BKGSD, key_BK1DT)


@graphattn_function
def DecodeQueries(query_BHSD):
    """split [1] int64: 1 when the call has one query (decode), else 0 — the number of
    queries that take the copy-the-chosen-keys form; the rest take the masked form."""
    length = op.Slice(op.Shape(query_BHSD), [2], [3])
    one = op.Constant(value_ints=[1])
    return op.Where(op.Equal(length, one), one, op.Constant(value_ints=[0]))


@graphattn_function
def ChosenBlockKeep(attention_mask_BT, chosen_BKGSC, block_size: int):
    """keep [B, Hkv, G or 1, S, T] bool: key t lies in one of the query's chosen blocks
    (``chosen``, -1 = none) and the query sees it — the selection as a mask over the whole
    cache, for prefill (no per-query copy of the chosen keys)."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    block = op.Reshape(op.Cast(block_size, to=INT64.dtype), [1], allowzero=1)
    total = op.Slice(op.Shape(attention_mask_BT), [1], [2])
    blocks = op.Div(op.Sub(op.Add(total, block), [1]), block)  # column N: "no block"
    index = op.Where(op.GreaterOrEqual(chosen_BKGSC, zero), chosen_BKGSC, op.Squeeze(blocks))
    lead = op.Slice(op.Shape(chosen_BKGSC), [0], [4])
    marks = op.Expand(op.Constant(value_float=0.0), op.Concat(lead, op.Add(blocks, [1]), axis=0))
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(index))
    marks = op.ScatterElements(marks, index, ones, axis=4, reduction="max")
    rel_BT = op.Sub(
        op.Unsqueeze(op.Range(zero, op.Squeeze(total), one), [0]), SparseRowStart(attention_mask_BT)
    )
    block_BT = op.Where(
        op.GreaterOrEqual(rel_BT, zero), op.Div(op.Max(rel_BT, zero), block), blocks
    )
    block_index = op.Expand(op.Unsqueeze(block_BT, [1, 2, 3]), op.Concat(lead, total, axis=0))
    chosen_keep = op.Greater(
        op.GatherElements(marks, block_index, axis=4), op.Constant(value_float=0.5)
    )
    length = op.Slice(lead, [3], [4])
    query_slot_S1 = op.Unsqueeze(
        op.Range(op.Squeeze(op.Sub(total, length)), op.Squeeze(total), one), [1]
    )
    in_order_ST = op.LessOrEqual(op.Range(zero, op.Squeeze(total), one), query_slot_S1)
    token_B11T = op.Unsqueeze(op.Cast(attention_mask_BT, to=BOOL.dtype), [1, 2])
    visible_B11ST = op.Unsqueeze(op.And(op.Unsqueeze(in_order_ST, [0, 1]), token_B11T), [2])
    return op.And(chosen_keep, visible_B11ST)


@graphattn_function
def KeepSoftmaxMix(scores_BKGST, keep_BKGST, value_BKTD):
    """output [B, H, S, D] = softmax(scores where keep, over T) V (keep may have G = 1)."""
    masked = op.Where(
        keep_BKGST, scores_BKGST, op.CastLike(op.Constant(value_float=MASKED_BIAS), scores_BKGST)
    )
    mixed_BKGSD = op.MatMul(op.Softmax(masked, axis=-1), op.Unsqueeze(value_BKTD, [2]))
    shape = op.Shape(mixed_BKGSD)
    heads = op.Mul(op.Slice(shape, [1], [2]), op.Slice(shape, [2], [3]))
    output_shape = op.Concat(op.Slice(shape, [0], [1]), heads, op.Slice(shape, [3], [5]), axis=0)
    return op.Reshape(mixed_BKGSD, output_shape, allowzero=1)


@graphattn_function
def NsaCoarse(
    query_BHSD,
    key_BKTD,
    value_BKTD,
    attention_mask_BT,
    block_size: int,
    top_blocks: int,
    scale: float,
    shared: int,
):
    """O_c [B, H, S, D]: attention over the visible keys of each query's top-c blocks."""
    scores = CausalBlockScores(
        query_BHSD, key_BKTD, attention_mask_BT, block_size=block_size, scale=scale, cosine=0
    )
    chosen = ChooseTop(scores, top=top_blocks, shared=shared)
    # One query (decode) copies its chosen keys; several (prefill) mask the whole cache
    # instead. No If (onnxruntime cannot type an If inside a function): each form runs on its
    # share of the queries, all of them or none (a zero-length S costs nothing).
    split = DecodeQueries(query_BHSD)
    last = [9223372036854775807]
    decode_chosen = op.Slice(chosen, [0], split, [3])
    slots = SelectedBlockSlots(decode_chosen, attention_mask_BT, block_size=block_size)
    decode = SelectedAttention(
        op.Slice(query_BHSD, [0], split, [2]),
        GatherSlots(key_BKTD, slots),
        GatherSlots(value_BKTD, slots),
        slots,
        scale=scale,
    )
    prefill_chosen = op.Slice(chosen, split, last, [3])
    keep = ChosenBlockKeep(attention_mask_BT, prefill_chosen, block_size=block_size)
    scores = KeyScores(op.Slice(query_BHSD, split, last, [2]), key_BKTD, scale=scale)
    prefill = KeepSoftmaxMix(scores, keep, value_BKTD)
    return op.Concat(decode, prefill, axis=2)


@graphattn_function
def NsaFine(
    query_BHSD, key_BKTD, value_BKTD, attention_mask_BT, top_tokens: int, scale: float, shared: int
):
    """O_f [B, H, S, D]: attention over each query's top-f visible keys by scaled score."""
    scores_BKGST = KeyScores(query_BHSD, key_BKTD, scale=scale)
    one = op.Constant(value_int=1)
    total = op.Squeeze(op.Slice(op.Shape(attention_mask_BT), [1], [2]))
    length = op.Squeeze(op.Slice(op.Shape(query_BHSD), [2], [3]))
    slots_T = op.Range(op.Constant(value_int=0), total, one)
    query_slot_S1 = op.Unsqueeze(op.Range(op.Sub(total, length), total, one), [1])
    in_order_ST = op.LessOrEqual(slots_T, query_slot_S1)
    token_B11T = op.Unsqueeze(op.Cast(attention_mask_BT, to=BOOL.dtype), [1, 2])
    visible_B1ST = op.And(op.Unsqueeze(in_order_ST, [0, 1]), token_B11T)
    masked = op.Where(
        op.Unsqueeze(visible_B1ST, [2]),
        scores_BKGST,
        op.CastLike(op.Constant(value_float=NOT_CANDIDATE), scores_BKGST),
    )
    top_1 = op.Reshape(op.Cast(top_tokens, to=INT64.dtype), [1], allowzero=1)
    count = op.Min(top_1, op.Reshape(total, [1], allowzero=1))
    ranked, indices = op.TopK(GroupScores(masked, shared=shared), count, axis=-1)
    chosen = op.Greater(ranked, op.CastLike(op.Constant(value_float=NOT_CHOSEN_BELOW), ranked))
    slots = op.Where(chosen, indices, op.Constant(value_int=-1))
    chosen_shape = op.Concat(op.Slice(op.Shape(masked), [0], [4]), count, axis=0)
    # axis 4, not -1: onnx.reference's GatherElements mishandles a negative axis
    values = op.GatherElements(masked, op.Expand(indices, chosen_shape), axis=4)
    gathered = GatherSlots(value_BKTD, slots)
    return SelectedSoftmaxMix(values, slots, gathered)


@graphattn_function
def NsaWindow(query_BHSD, key_BKTD, value_BKTD, attention_mask_BT, window: int, scale: float):
    """O_w [B, H, S, D]: attention over the visible keys at most ``window - 1`` slots back;
    only the last ``S + window - 1`` keys are read."""
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    total = op.Squeeze(op.Slice(op.Shape(attention_mask_BT), [1], [2]))
    length = op.Squeeze(op.Slice(op.Shape(query_BHSD), [2], [3]))
    width = op.Cast(window, to=INT64.dtype)
    first = op.Max(op.Add(op.Sub(op.Sub(total, length), width), one), zero)
    first_1 = op.Reshape(first, [1], allowzero=1)
    key_BKWD = op.Slice(key_BKTD, first_1, [9223372036854775807], [2])
    value_BKWD = op.Slice(value_BKTD, first_1, [9223372036854775807], [2])
    slots_W = op.Range(first, total, one)
    query_slot_S1 = op.Unsqueeze(op.Range(op.Sub(total, length), total, one), [1])
    distance_SW = op.Sub(query_slot_S1, slots_W)
    in_window_SW = op.And(op.GreaterOrEqual(distance_SW, zero), op.Less(distance_SW, width))
    token_B1W = op.Unsqueeze(
        op.Cast(op.Slice(attention_mask_BT, first_1, [9223372036854775807], [1]), to=BOOL.dtype),
        [1],
    )
    keep_B1SW = op.Unsqueeze(op.And(op.Unsqueeze(in_window_SW, [0]), token_B1W), [1])
    scores = KeyScores(query_BHSD, key_BKWD, scale=scale)
    return MaskedSoftmaxMix(scores, KeepToBias(keep_B1SW), value_BKWD)


@graphattn_function
def NativeSparseAttention(
    query_BHSD,
    key_BKTD,
    value_BKTD,
    attention_mask_BT,
    gate_coarse_BHS1,
    gate_fine_BHS1,
    gate_window_BHS1,
    block_size: int,
    top_blocks: int,
    top_tokens: int,
    window: int,
    scale: float,
    shared: int,
):
    """output [B, H, S, D] = σ(g_c) O_c + σ(g_f) O_f + σ(g_w) O_w (see the module docstring);
    gates broadcastable to [B, H, S, 1]."""
    coarse = NsaCoarse(
        query_BHSD,
        key_BKTD,
        value_BKTD,
        attention_mask_BT,
        block_size=block_size,
        top_blocks=top_blocks,
        scale=scale,
        shared=shared,
    )
    fine = NsaFine(
        query_BHSD,
        key_BKTD,
        value_BKTD,
        attention_mask_BT,
        top_tokens=top_tokens,
        scale=scale,
        shared=shared,
    )
    local = NsaWindow(
        query_BHSD, key_BKTD, value_BKTD, attention_mask_BT, window=window, scale=scale
    )
    weight_c = op.Sigmoid(op.CastLike(gate_coarse_BHS1, query_BHSD))
    weight_f = op.Sigmoid(op.CastLike(gate_fine_BHS1, query_BHSD))
    weight_w = op.Sigmoid(op.CastLike(gate_window_BHS1, query_BHSD))
    return op.Add(op.Add(op.Mul(weight_c, coarse), op.Mul(weight_f, fine)), op.Mul(weight_w, local))


@graphattn_function
def SparseRotaryHalves(x, cos, sin):
    """x [..., D] with channel i < R rotated against channel i + R; cos/sin [..., R]
    broadcast against x's leading axes (any rank)."""
    half = op.Slice(op.Shape(cos), [-1], [9223372036854775807])
    rotary = op.Add(half, half)
    first = op.Slice(x, [0], half, [-1])
    second = op.Slice(x, half, rotary, [-1])
    passed = op.Slice(x, rotary, [9223372036854775807], [-1])
    cos_x = op.CastLike(cos, x)
    sin_x = op.CastLike(sin, x)
    rotated_first = op.Sub(op.Mul(first, cos_x), op.Mul(second, sin_x))
    rotated_second = op.Add(op.Mul(second, cos_x), op.Mul(first, sin_x))
    return op.Concat(rotated_first, rotated_second, passed, axis=-1)


@graphattn_function
def SparseRotaryInterleaved(x, cos, sin):
    """x [..., D] with channel 2i rotated against channel 2i + 1 for i < R (any rank)."""
    half = op.Slice(op.Shape(cos), [-1], [9223372036854775807])
    rotary = op.Add(half, half)
    even = op.Slice(x, [0], rotary, [-1], [2])
    odd = op.Slice(x, [1], rotary, [-1], [2])
    passed = op.Slice(x, rotary, [9223372036854775807], [-1])
    cos_x = op.CastLike(cos, x)
    sin_x = op.CastLike(sin, x)
    rotated_even = op.Unsqueeze(op.Sub(op.Mul(even, cos_x), op.Mul(odd, sin_x)), [-1])
    rotated_odd = op.Unsqueeze(op.Add(op.Mul(odd, cos_x), op.Mul(even, sin_x)), [-1])
    pairs = op.Concat(rotated_even, rotated_odd, axis=-1)
    pairs_shape = op.Concat(op.Slice(op.Shape(pairs), [0], [-2]), rotary, axis=0)
    return op.Concat(op.Reshape(pairs, pairs_shape, allowzero=1), passed, axis=-1)


@graphattn_function
def RoutedSelection(
    query_BHSD, key_BKTD, attention_mask_BT, segment_size: int, top_k: int, shared: int
):
    """chosen [B, Hkv, G or 1, S, k]: each query's top-k segments by cosine similarity of the
    (un-rotated) query and the segment centroids; -1 where none."""
    scores = CausalBlockScores(
        query_BHSD, key_BKTD, attention_mask_BT, block_size=segment_size, scale=1.0, cosine=1
    )
    return ChooseTop(scores, top=top_k, shared=shared)


@graphattn_function
def QueryRows(table_BTR, query_BHSD):
    """table [B, 1, S, R]: the last S rows of ``table [B, T, R]`` (the queries' slots)."""
    length = op.Slice(op.Shape(query_BHSD), [2], [3])
    return op.Unsqueeze(op.Slice(table_BTR, op.Neg(length), [9223372036854775807], [1]), [1])


def _routed_attention(rotary: OnnxFunction, name: str, doc: str) -> OnnxFunction:
    """The routed attention function ``name`` rotating the query and keys with ``rotary``
    (SparseRotaryHalves or SparseRotaryInterleaved): both variants compile this one body."""

    def SparseRoutedAttention(
        query_BHSD,
        key_BKTD,
        value_BKTD,
        attention_mask_BT,
        cos_BTR,
        sin_BTR,
        segment_size: int,
        top_k: int,
        scale: float,
        shared: int,
    ):
        chosen = RoutedSelection(
            query_BHSD,
            key_BKTD,
            attention_mask_BT,
            segment_size=segment_size,
            top_k=top_k,
            shared=shared,
        )
        rotated_query = rotary(
            query_BHSD, QueryRows(cos_BTR, query_BHSD), QueryRows(sin_BTR, query_BHSD)
        )
        # decode copies and rotates the chosen keys; prefill rotates every key once and masks
        # (see NsaCoarse; the prefill keys are cut to length 0 when decoding)
        split = DecodeQueries(query_BHSD)
        last = [9223372036854775807]
        slots = SelectedBlockSlots(
            op.Slice(chosen, [0], split, [3]), attention_mask_BT, block_size=segment_size
        )
        rotated_keys = rotary(
            GatherSlots(key_BKTD, slots),
            GatherSlots(op.Unsqueeze(cos_BTR, [1]), slots),
            GatherSlots(op.Unsqueeze(sin_BTR, [1]), slots),
        )
        decode = SelectedAttention(
            op.Slice(rotated_query, [0], split, [2]),
            rotated_keys,
            GatherSlots(value_BKTD, slots),
            slots,
            scale=scale,
        )
        keys_used = op.Mul(op.Slice(op.Shape(key_BKTD), [2], [3]), op.Sub([1], split))
        prefill_keys = op.Slice(key_BKTD, [0], keys_used, [2])
        rotated_all = rotary(
            prefill_keys,
            op.Unsqueeze(op.Slice(cos_BTR, [0], keys_used, [1]), [1]),
            op.Unsqueeze(op.Slice(sin_BTR, [0], keys_used, [1]), [1]),
        )
        keep = ChosenBlockKeep(
            attention_mask_BT, op.Slice(chosen, split, last, [3]), block_size=segment_size
        )
        scores = KeyScores(op.Slice(rotated_query, split, last, [2]), rotated_all, scale=scale)
        prefill = KeepSoftmaxMix(
            scores, op.Slice(keep, [0], keys_used, [4]), op.Slice(value_BKTD, [0], keys_used, [2])
        )
        return op.Concat(decode, prefill, axis=2)

    return graphattn_function(SparseRoutedAttention, name=name, doc=doc)


SparseRoutedAttention = _routed_attention(
    SparseRotaryHalves,
    "SparseRoutedAttention",
    "output [B, H, S, D]: routed attention with split-halves RoPE (module docstring).",
)
SparseRoutedAttentionInterleaved = _routed_attention(
    SparseRotaryInterleaved,
    "SparseRoutedAttentionInterleaved",
    "output [B, H, S, D]: routed attention with interleaved (GPT-J) RoPE.",
)


# ------------------------------------------------------------------------------ emitters
def _check_count(parameter: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{parameter} must be an int >= 1, got {value!r}")
    return value


SELECTIONS = ("head", "group")


def _check_selection(selection: str) -> int:
    """``head``: every query head selects its own blocks/keys; ``group``: the G query heads of
    a KV head share one selection, by the sum of their scores (the attribute ``shared``)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    return int(selection == "group")


def _static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def _check_inputs(
    query_BHSD: ir.Value,
    key_BKSD: ir.Value,
    value_BKSD: ir.Value,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    _check_heads(num_heads, kv_heads, head_dim)
    for parameter, value in (("query", query_BHSD), ("key", key_BKSD), ("value", value_BKSD)):
        require_rank(value, 4, parameter)
    for parameter, value, heads in (
        ("query", query_BHSD, num_heads),
        ("key", key_BKSD, kv_heads),
        ("value", value_BKSD, kv_heads),
    ):
        known = _static_dim(value, 1)
        if known is not None and known != heads:
            raise ValueError(f"{parameter} has {known} heads on axis 1, expected {heads}")
        known = _static_dim(value, 3)
        if known is not None and known != head_dim:
            raise ValueError(f"{parameter} has head_dim {known} on axis 3, expected {head_dim}")


def _with_past(
    g: GraphEmitter,
    key_BKSD: ir.Value,
    value_BKSD: ir.Value,
    past_key_BKPD: ir.Value | None,
    past_value_BKPD: ir.Value | None,
    name: str,
) -> tuple[ir.Value, ir.Value]:
    if (past_key_BKPD is None) != (past_value_BKPD is None):
        raise ValueError("past_key and past_value must be given together")
    if past_key_BKPD is None:
        return key_BKSD, value_BKSD
    require_rank(past_key_BKPD, 4, "past_key")
    require_rank(past_value_BKPD, 4, "past_value")
    key_BKTD = g.op("Concat", [past_key_BKPD, key_BKSD], {"axis": 2}, name=f"{name}/present_key")
    value_BKTD = g.op(
        "Concat", [past_value_BKPD, value_BKSD], {"axis": 2}, name=f"{name}/present_value"
    )
    return key_BKTD, value_BKTD


def _mask_or_ones(
    g: GraphEmitter,
    attention_mask_BT: ir.Value | None,
    query_BHSD: ir.Value,
    key_BKTD: ir.Value,
    name: str,
) -> ir.Value:
    """The given ``attention_mask [B, T]`` int64, or ones of that shape read from the inputs."""
    if attention_mask_BT is not None:
        require_rank(attention_mask_BT, 2, "attention_mask")
        return attention_mask_BT
    batch = g.op("Shape", [query_BHSD], {"start": 0, "end": 1}, name=f"{name}/mask_batch")
    total = g.op("Shape", [key_BKTD], {"start": 2, "end": 3}, name=f"{name}/mask_total")
    shape = g.op("Concat", [batch, total], {"axis": 0}, name=f"{name}/mask_shape")
    one = ir.tensor(np.ones(1, dtype=np.int64), name="one")
    return g.op("ConstantOfShape", [shape], {"value": one}, name=f"{name}/mask_ones")


def _gate(g: GraphEmitter, gate: ir.Value, num_heads: int, what: str, name: str) -> ir.Value:
    """A gate logit as [1, H, 1, 1] (from [H]) or [B, H, S, 1] (from per-token [B, S, H])."""
    rank = _gate_rank(gate, what)
    heads = _static_dim(gate, rank - 1)
    if heads is not None and heads != num_heads:
        raise ValueError(f"{what} must have one logit per query head ({num_heads}), got {heads}")
    if rank == 1:
        return g.op("Reshape", [gate, _shape_const(g, [1, -1, 1, 1], f"{name}/shape")], name=name)
    transposed = g.op("Transpose", [gate], {"perm": [0, 2, 1]}, name=f"{name}/heads_first")
    return g.op("Unsqueeze", [transposed, _shape_const(g, [3], f"{name}/axis")], name=name)


def _gate_rank(gate: ir.Value, what: str) -> int:
    """The rank of a gate input: 1 ([H]) or 3 ([B, S, H]); unknown ranks are refused."""
    if gate.shape is None or len(gate.shape) not in (1, 3):
        got = "unknown" if gate.shape is None else f"rank {len(gate.shape)} ({gate.shape})"
        raise ValueError(f"{what} must be [num_heads] or [batch, sequence, num_heads], got {got}")
    return len(gate.shape)


def _shape_const(g: GraphEmitter, values: list[int], name: str) -> ir.Value:
    return g.constant(name, np.array(values, dtype=np.int64))


def native_sparse_attention(
    g: GraphEmitter,
    query_BHSD: ir.Value,
    key_BKSD: ir.Value,
    value_BKSD: ir.Value,
    *,
    gate_coarse: ir.Value,
    gate_fine: ir.Value,
    gate_window: ir.Value,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    top_blocks: int,
    top_tokens: int,
    window: int,
    attention_mask_BT: ir.Value | None = None,
    scale: float | None = None,
    selection: str = "head",
    past_key_BKPD: ir.Value | None = None,
    past_value_BKPD: ir.Value | None = None,
    name: str = "nsa",
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit ``NativeSparseAttention``; returns ``(output [B, H, S, D], present_key,
    present_value [B, Hkv, T, D])``.

    ``query``/``key`` are rotated already (the model's RoPE); ``key``/``value`` hold the new
    positions and are appended to ``past_key/past_value [B, Hkv, P, D]`` when given. Gates:
    ``[num_heads]`` logits (learned per head) or ``[B, S, num_heads]`` (per token).
    ``attention_mask [B, T]`` int64 (default: all ones). ``scale`` defaults to
    ``1/sqrt(head_dim)``. ``selection``: ``head`` (each query head picks its own blocks and
    keys) or ``group`` (the query heads of one KV head share the picks, by summed scores).
    """
    _check_inputs(query_BHSD, key_BKSD, value_BKSD, num_heads, kv_heads, head_dim)
    attributes = {
        "block_size": _check_count("block_size", block_size),
        "top_blocks": _check_count("top_blocks", top_blocks),
        "top_tokens": _check_count("top_tokens", top_tokens),
        "window": _check_count("window", window),
        "scale": 1.0 / math.sqrt(head_dim) if scale is None else _check_positive("scale", scale),
        "shared": _check_selection(selection),
    }
    key_BKTD, value_BKTD = _with_past(g, key_BKSD, value_BKSD, past_key_BKPD, past_value_BKPD, name)
    mask = _mask_or_ones(g, attention_mask_BT, query_BHSD, key_BKTD, name)
    gates = [
        _gate(g, gate, num_heads, what, f"{name}/{what}")
        for what, gate in (
            ("gate_coarse", gate_coarse),
            ("gate_fine", gate_fine),
            ("gate_window", gate_window),
        )
    ]
    output = g.call(
        NativeSparseAttention,
        [query_BHSD, key_BKTD, value_BKTD, mask, *gates],
        attributes,
        name=name,
    )
    return output, key_BKTD, value_BKTD


def sparse_routed_attention(
    g: GraphEmitter,
    query_BHSD: ir.Value,
    key_BKSD: ir.Value,
    value_BKSD: ir.Value,
    *,
    cos_BTR: ir.Value,
    sin_BTR: ir.Value,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    segment_size: int,
    top_k: int,
    interleaved: bool = False,
    attention_mask_BT: ir.Value | None = None,
    scale: float | None = None,
    selection: str = "head",
    past_key_BKPD: ir.Value | None = None,
    past_value_BKPD: ir.Value | None = None,
    name: str = "routed",
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit ``SparseRoutedAttention[Interleaved]``; returns ``(output [B, H, S, D],
    present_key, present_value [B, Hkv, T, D])`` — the presents hold keys *before* RoPE.

    ``query``/``key`` are not rotated; ``cos/sin [B, T, R]`` hold every slot's RoPE table
    (past and new: the gathered keys rotate at their own positions), ``2R <= head_dim``.
    ``selection``: ``head`` or ``group`` (the query heads of a KV head share the segments,
    by their summed cosine similarities).
    """
    _check_inputs(query_BHSD, key_BKSD, value_BKSD, num_heads, kv_heads, head_dim)
    require_rank(cos_BTR, 3, "cos")
    require_rank(sin_BTR, 3, "sin")
    half = _static_dim(cos_BTR, 2)
    if half is not None and not 1 <= half <= head_dim // 2:
        raise ValueError(
            f"cos/sin have {half} frequencies; 2 * {half} must be in [2, head_dim={head_dim}]"
        )
    attributes = {
        "segment_size": _check_count("segment_size", segment_size),
        "top_k": _check_count("top_k", top_k),
        "scale": 1.0 / math.sqrt(head_dim) if scale is None else _check_positive("scale", scale),
        "shared": _check_selection(selection),
    }
    key_BKTD, value_BKTD = _with_past(g, key_BKSD, value_BKSD, past_key_BKPD, past_value_BKPD, name)
    mask = _mask_or_ones(g, attention_mask_BT, query_BHSD, key_BKTD, name)
    function = SparseRoutedAttentionInterleaved if interleaved else SparseRoutedAttention
    output = g.call(
        function, [query_BHSD, key_BKTD, value_BKTD, mask, cos_BTR, sin_BTR], attributes, name=name
    )
    return output, key_BKTD, value_BKTD


__all__ = ["native_sparse_attention", "sparse_routed_attention"]
