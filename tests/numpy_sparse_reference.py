"""Independent float64 NumPy references for native sparse attention and sparse routed attention.

Written from the definitions in the README (shares no code with ``ops/``), one query head and
one query at a time:

- row b's relative position of slot t is ``t - start_b`` (start_b: the first slot whose mask is
  1); block n holds relative positions ``n·L .. n·L + L - 1``;
- query i sits at slot ``s = T - S + i`` and *sees* key t iff ``mask[b, t] == 1`` and ``t <= s``;
- a block is a candidate iff the query sees one of its keys; its summary (NSA mean key, routed
  centroid) is the mean of the keys the query sees in it;
- top-c / top-f / top-k by score, fewer when there are fewer candidates; per query head, or
  (``shared``) once per KV head by the sum of its query heads' scores.

Each function also returns the smallest *selection margin*: over every query that had more
candidates than it takes, the gap between its last chosen and first rejected score. A test
compares only when that margin is large, so that fp32 rounding cannot flip a choice (ties are
excluded by construction, not by tolerance).
"""

import numpy as np


def row_start(mask_row: np.ndarray) -> int:
    for t, flag in enumerate(mask_row):
        if flag == 1:
            return t
    return 0


def softmax_mix(scores: list[float], values: list[np.ndarray], dim: int) -> np.ndarray:
    """sum_j softmax(scores)_j values_j; NaN when nothing is attended."""
    if not scores:
        return np.full(dim, np.nan)
    top = max(scores)
    weights = [np.exp(x - top) for x in scores]
    total = sum(weights)
    out = np.zeros(dim)
    for w, v in zip(weights, values):
        out += (w / total) * v
    return out


def choose(scores: dict, count: int, margins: list[float]) -> list:
    """The ``count`` keys of ``scores`` with the highest values (all when fewer)."""
    order = sorted(scores, key=lambda key: -scores[key])
    if len(order) > count:
        margins.append(scores[order[count - 1]] - scores[order[count]])
    return order[:count]


def visible_keys(mask_row: np.ndarray, slot: int) -> list[int]:
    return [t for t in range(slot + 1) if mask_row[t] == 1]


def blocks_seen(mask_row: np.ndarray, slot: int, size: int) -> dict[int, list[int]]:
    """block index → the slots of its keys that the query at ``slot`` sees."""
    start = row_start(mask_row)
    blocks: dict[int, list[int]] = {}
    for t in visible_keys(mask_row, slot):
        blocks.setdefault((t - start) // size, []).append(t)
    return blocks


def choose_per_head(scores: list[dict], count: int, shared: bool, margins: list[float]) -> list:
    """For each query head of a group, its chosen keys: its own top ``count`` (``shared``
    False) or the group's, ranked by the sum of the heads' scores (``shared`` True)."""
    if not shared:
        return [choose(head_scores, count, margins) for head_scores in scores]
    summed = {key: sum(head_scores[key] for head_scores in scores) for key in scores[0]}
    picked = choose(summed, count, margins)
    return [picked for _ in scores]


def native_sparse_attention(
    q, k, v, mask, gates, block_size, top_blocks, top_tokens, window, scale, shared=False
):
    """q [B, H, S, D], k/v [B, Hkv, T, D], mask [B, T], gates (coarse, fine, window) each
    [B, H, S] logits → (out [B, H, S, D] float64, smallest selection margin). ``shared``: the
    query heads of a KV head share each selection (by their summed scores)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, heads, length, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = np.zeros((batch, heads, length, dim))
    margins: list[float] = []
    for b in range(batch):
        for kh in range(kv_heads):
            group_heads = range(kh * group, (kh + 1) * group)
            for i in range(length):
                slot = total - length + i
                seen = visible_keys(mask[b], slot)
                blocks = blocks_seen(mask[b], slot, block_size)
                means = {
                    n: np.mean([k[b, kh, t] for t in keys], axis=0) for n, keys in blocks.items()
                }
                # coarse: blocks scored by the mean of the keys seen in them
                block_scores = [
                    {n: scale * float(q[b, h, i] @ mean) for n, mean in means.items()}
                    for h in group_heads
                ]
                chosen_blocks = choose_per_head(block_scores, top_blocks, shared, margins)
                # fine: the top-f keys by scaled score
                key_scores = [
                    {t: scale * float(q[b, h, i] @ k[b, kh, t]) for t in seen} for h in group_heads
                ]
                chosen_keys = choose_per_head(key_scores, top_tokens, shared, margins)
                for j, h in enumerate(group_heads):
                    scores = key_scores[j]
                    coarse_keys = sorted(t for n in chosen_blocks[j] for t in blocks[n])
                    coarse = softmax_mix(
                        [scores[t] for t in coarse_keys], [v[b, kh, t] for t in coarse_keys], dim
                    )
                    fine = softmax_mix(
                        [scores[t] for t in chosen_keys[j]],
                        [v[b, kh, t] for t in chosen_keys[j]],
                        dim,
                    )
                    # window: keys less than W slots back
                    local_keys = [t for t in seen if slot - t < window]
                    local = softmax_mix(
                        [scores[t] for t in local_keys], [v[b, kh, t] for t in local_keys], dim
                    )
                    weights = [1.0 / (1.0 + np.exp(-float(g[b, h, i]))) for g in gates]
                    out[b, h, i] = weights[0] * coarse + weights[1] * fine + weights[2] * local
    return out, min(margins, default=np.inf)


def rotate(x: np.ndarray, angles: np.ndarray, interleaved: bool) -> np.ndarray:
    """x [D] rotated by ``angles [R]`` as complex multiplication of channel pairs."""
    x = np.array(x, dtype=np.float64)
    half = len(angles)
    for j in range(half):
        a, c = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
        z = complex(x[a], x[c]) * complex(np.cos(angles[j]), np.sin(angles[j]))
        x[a], x[c] = z.real, z.imag
    return x


def sparse_routed_attention(
    q, k, v, mask, positions, inv_freq, segment_size, top_k, scale, interleaved, shared=False
):
    """q [B, H, S, D], k/v [B, Hkv, T, D] before RoPE, mask [B, T], positions [B, T] (each
    slot's RoPE position), inv_freq [R] → (out [B, H, S, D] float64, smallest margin).
    ``shared``: the query heads of a KV head share the segments (summed similarities)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    batch, heads, length, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = np.zeros((batch, heads, length, dim))
    margins: list[float] = []
    for b in range(batch):
        for kh in range(kv_heads):
            group_heads = range(kh * group, (kh + 1) * group)
            for i in range(length):
                slot = total - length + i
                segments = blocks_seen(mask[b], slot, segment_size)
                similarity = []
                for h in group_heads:
                    query = q[b, h, i]
                    head_similarity = {}
                    for n, keys in segments.items():
                        centroid = np.mean([k[b, kh, t] for t in keys], axis=0)
                        norms = max(np.linalg.norm(query), 1e-12) * max(
                            np.linalg.norm(centroid), 1e-12
                        )
                        head_similarity[n] = float(query @ centroid) / norms
                    similarity.append(head_similarity)
                chosen = choose_per_head(similarity, top_k, shared, margins)
                for j, h in enumerate(group_heads):
                    keys = sorted(t for n in chosen[j] for t in segments[n])
                    rotated_query = rotate(q[b, h, i], positions[b, slot] * inv_freq, interleaved)
                    scores = [
                        scale
                        * float(
                            rotated_query
                            @ rotate(k[b, kh, t], positions[b, t] * inv_freq, interleaved)
                        )
                        for t in keys
                    ]
                    out[b, h, i] = softmax_mix(scores, [v[b, kh, t] for t in keys], dim)
    return out, min(margins, default=np.inf)
