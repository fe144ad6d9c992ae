"""Scaled dot-product attention: multi-head, grouped-query and multi-query, with KV cache.

Layouts: query ``[B, H, S, D]``; key/value ``[B, Hkv, T, D]``; bias ``[B or 1, 1, S, T]``.
Query heads are grouped per KV head (``G = H / Hkv``; query head ``h`` reads KV head
``h // G``) by a reshape to ``[B, Hkv, G, S, D]``, so K and V are never copied per query head.
MHA is ``Hkv = H``; MQA is ``Hkv = 1``.

Score pipeline: ``scores = scale * Q Kᵀ`` → optional softcap ``c * tanh(scores / c)`` →
optional scalable softmax (scores times ``s * log(n)``, n = keys this query attends) →
``softmax(scores + bias) V``. With attention sinks (GPT-OSS) each row's softmax also holds one
learned logit ``sinks[h]`` per query head that mixes no value: ``softmax([scores + bias,
sinks[h]])`` without its last column, so the row's weights sum to less than one. Each variant
is its own small function so the graph only computes what the model uses; all share the same
building blocks.
"""

import math

import onnx_ir as ir

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.masks import BiasToKeep, bool_mask_to_bias, position_bias


@graphattn_function
def GroupedScores(query_BHSD, key_BKTD, scale: float):
    """scores [B, Hkv, G, S, T] = scale * Q Kᵀ with query heads grouped per KV head."""
    query_shape = op.Shape(query_BHSD)
    grouped_shape = op.Concat(
        op.Slice(op.Shape(key_BKTD), [0], [2]), [-1], op.Slice(query_shape, [2], [4]), axis=0
    )
    query_BKGSD = op.Reshape(op.Mul(query_BHSD, op.CastLike(scale, query_BHSD)), grouped_shape)
    key_BK1DT = op.Unsqueeze(op.Transpose(key_BKTD, perm=[0, 1, 3, 2]), [2])
    return op.MatMul(query_BKGSD, key_BK1DT)


@graphattn_function
def Softcap(scores, softcap: float):
    """scores (any shape) capped smoothly to (-cap, cap): softcap * tanh(scores / softcap)."""
    cap = op.CastLike(softcap, scores)
    return op.Mul(op.Tanh(op.Div(scores, cap)), cap)


@graphattn_function
def ScalableSoftmaxScale(scores_BKGST, bias_B1ST, ssmax_s: float):
    """scores [B, Hkv, G, S, T] times ``ssmax_s * log(n)``, n = keys each query attends (≥ 1)."""
    keep_B1ST = BiasToKeep(bias_B1ST)
    attended_B1S1 = op.ReduceSum(op.Cast(keep_B1ST, to=1), [-1], keepdims=1)
    log_n_B1S1 = op.Log(op.Max(attended_B1S1, op.Constant(value_float=1.0)))
    factor_B11S1 = op.Unsqueeze(op.Mul(log_n_B1S1, op.Constant(value_float=ssmax_s)), [2])
    return op.Mul(scores_BKGST, op.CastLike(factor_B11S1, scores_BKGST))


@graphattn_function
def MaskedSoftmaxMix(scores_BKGST, bias_B1ST, value_BKTD):
    """output [B, H, S, D] = softmax(scores + bias, over T) V, heads ungrouped again."""
    bias_B11ST = op.Unsqueeze(op.CastLike(bias_B1ST, scores_BKGST), [2])
    probs_BKGST = op.Softmax(op.Add(scores_BKGST, bias_B11ST), axis=-1)
    mixed_BKGSD = op.MatMul(probs_BKGST, op.Unsqueeze(value_BKTD, [2]))
    mixed_shape = op.Shape(mixed_BKGSD)
    output_shape = op.Concat(
        op.Slice(mixed_shape, [0], [1]), [-1], op.Slice(mixed_shape, [3], [5]), axis=0
    )
    return op.Reshape(mixed_BKGSD, output_shape)


@graphattn_function
def ScaledDotProductAttention(query_BHSD, key_BKTD, value_BKTD, bias_B1ST, scale: float):
    """output [B, H, S, D] = softmax(scale Q Kᵀ + bias) V."""
    scores = GroupedScores(query_BHSD, key_BKTD, scale=scale)
    return MaskedSoftmaxMix(scores, bias_B1ST, value_BKTD)


@graphattn_function
def ScaledDotProductAttentionSoftcap(
    query_BHSD, key_BKTD, value_BKTD, bias_B1ST, scale: float, softcap: float
):
    """output [B, H, S, D] = softmax(softcap(scale Q Kᵀ) + bias) V."""
    scores = Softcap(GroupedScores(query_BHSD, key_BKTD, scale=scale), softcap=softcap)
    return MaskedSoftmaxMix(scores, bias_B1ST, value_BKTD)


@graphattn_function
def ScaledDotProductAttentionSSMax(
    query_BHSD, key_BKTD, value_BKTD, bias_B1ST, scale: float, ssmax_s: float
):
    """output [B, H, S, D] = softmax(s log(n) scale Q Kᵀ + bias) V (scalable softmax)."""
    scores = GroupedScores(query_BHSD, key_BKTD, scale=scale)
    scaled = ScalableSoftmaxScale(scores, bias_B1ST, ssmax_s=ssmax_s)
    return MaskedSoftmaxMix(scaled, bias_B1ST, value_BKTD)


@graphattn_function
def ScaledDotProductAttentionSoftcapSSMax(
    query_BHSD, key_BKTD, value_BKTD, bias_B1ST, scale: float, softcap: float, ssmax_s: float
):
    """output [B, H, S, D]: softcap first, then scalable softmax, then the masked softmax."""
    scores = Softcap(GroupedScores(query_BHSD, key_BKTD, scale=scale), softcap=softcap)
    scaled = ScalableSoftmaxScale(scores, bias_B1ST, ssmax_s=ssmax_s)
    return MaskedSoftmaxMix(scaled, bias_B1ST, value_BKTD)


@graphattn_function
def MaskedSoftmaxMixHeadBias(scores_BKGST, bias_BHST, value_BKTD):
    """MaskedSoftmaxMix with a bias per query head [B, H, S, T] (ALiBi plus the mask)."""
    grouped_shape = op.Concat(
        op.Slice(op.Shape(scores_BKGST), [0], [3]), op.Slice(op.Shape(bias_BHST), [2], [4]), axis=0
    )
    bias_BKGST = op.Reshape(op.CastLike(bias_BHST, scores_BKGST), grouped_shape)
    probs_BKGST = op.Softmax(op.Add(scores_BKGST, bias_BKGST), axis=-1)
    mixed_BKGSD = op.MatMul(probs_BKGST, op.Unsqueeze(value_BKTD, [2]))
    mixed_shape = op.Shape(mixed_BKGSD)
    output_shape = op.Concat(
        op.Slice(mixed_shape, [0], [1]), [-1], op.Slice(mixed_shape, [3], [5]), axis=0
    )
    return op.Reshape(mixed_BKGSD, output_shape)


@graphattn_function
def ScaledDotProductAttentionHeadBias(query_BHSD, key_BKTD, value_BKTD, bias_BHST, scale: float):
    """output [B, H, S, D] = softmax(scale Q Kᵀ + bias) V with a bias per query head."""
    scores = GroupedScores(query_BHSD, key_BKTD, scale=scale)
    return MaskedSoftmaxMixHeadBias(scores, bias_BHST, value_BKTD)


@graphattn_function
def MaskedSoftmaxMixSinks(scores_BKGST, bias_B1ST, sinks_H, value_BKTD):
    """output [B, H, S, D] = softmax([scores + bias, sink_h], over T + 1)[..., :T] V: one
    extra logit per query head (``sinks_H [H]``, head h = kv·G + g) in every row's softmax,
    not masked by the bias, mixing no value."""
    bias_B11ST = op.Unsqueeze(op.CastLike(bias_B1ST, scores_BKGST), [2])
    logits_BKGST = op.Add(scores_BKGST, bias_B11ST)
    logits_shape = op.Shape(logits_BKGST)
    sinks_1KG11 = op.Reshape(
        op.CastLike(sinks_H, scores_BKGST),
        op.Concat([1], op.Slice(logits_shape, [1], [3]), [1, 1], axis=0),
    )
    sinks_BKGS1 = op.Expand(sinks_1KG11, op.Concat(op.Slice(logits_shape, [0], [4]), [1], axis=0))
    combined_BKGSU = op.Concat(logits_BKGST, sinks_BKGS1, axis=-1)  # U = T + 1
    probs_BKGSU = op.Softmax(combined_BKGSU, axis=-1)
    probs_BKGST = op.Slice(probs_BKGSU, [0], [-1], [-1])
    mixed_BKGSD = op.MatMul(probs_BKGST, op.Unsqueeze(value_BKTD, [2]))
    mixed_shape = op.Shape(mixed_BKGSD)
    output_shape = op.Concat(
        op.Slice(mixed_shape, [0], [1]), [-1], op.Slice(mixed_shape, [3], [5]), axis=0
    )
    return op.Reshape(mixed_BKGSD, output_shape)


@graphattn_function
def ScaledDotProductAttentionSinks(
    query_BHSD, key_BKTD, value_BKTD, bias_B1ST, sinks_H, scale: float
):
    """output [B, H, S, D] = softmax([scale Q Kᵀ + bias, sink_h])[..., :T] V (GPT-OSS)."""
    scores = GroupedScores(query_BHSD, key_BKTD, scale=scale)
    return MaskedSoftmaxMixSinks(scores, bias_B1ST, sinks_H, value_BKTD)


_VARIANTS = {
    (False, False): ScaledDotProductAttention,
    (True, False): ScaledDotProductAttentionSoftcap,
    (False, True): ScaledDotProductAttentionSSMax,
    (True, True): ScaledDotProductAttentionSoftcapSSMax,
}


def _check_heads(num_heads: int, kv_heads: int, head_dim: int) -> None:
    for parameter, value in (
        ("num_heads", num_heads),
        ("kv_heads", kv_heads),
        ("head_dim", head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{parameter} must be a positive int, got {value!r}")
    if num_heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide num_heads={num_heads}")


def _check_sinks(sinks_H: ir.Value, num_heads: int, *, softcap: bool, ssmax: bool) -> None:
    """Attention sinks are one logit per query head, and go with the plain score pipeline."""
    require_rank(sinks_H, 1, "sinks")
    shape = sinks_H.shape
    if shape is not None and isinstance(shape[0], int) and shape[0] != num_heads:
        raise ValueError(f"sinks must have one value per query head ({num_heads}), got {shape[0]}")
    if softcap or ssmax:
        raise ValueError("attention sinks with a softcap or scalable softmax are not supported")


def _check_positive(parameter: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{parameter} must be a positive number or None, got {value!r}")
    return float(value)


def scaled_dot_product_attention(
    g: GraphEmitter,
    query_BHSD: ir.Value,
    key_BKSD: ir.Value,
    value_BKSD: ir.Value,
    *,
    num_heads: int,
    kv_heads: int,
    head_dim: int,
    mask: ir.Value | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    ssmax_s: float | None = None,
    sinks_H: ir.Value | None = None,
    past_key_BKPD: ir.Value | None = None,
    past_value_BKPD: ir.Value | None = None,
    name: str = "attn",
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit attention; returns ``(output [B, H, S, D], present_key, present_value [B, Hkv, T, D])``.

    ``key``/``value`` hold the new positions ``[B, Hkv, S, D]``; with ``past_key``/``past_value``
    ``[B, Hkv, P, D]`` they are appended to make the presents (T = P + S), otherwise the presents
    are the new key/value themselves. ``mask`` is an additive float bias or a boolean keep-mask
    ``[B or 1, 1, S, T]`` (see ``graphattn.ops.masks``); ``causal``/``window`` add a positional
    mask built from the shapes (leave them off when ``mask`` already carries them). ``scale``
    defaults to ``1/sqrt(head_dim)``. ``sinks_H [num_heads]``: one learned logit per query head
    in every row's softmax (attention sinks, GPT-OSS); not with ``softcap`` or ``ssmax_s``.
    """
    _check_heads(num_heads, kv_heads, head_dim)
    softcap = _check_positive("softcap", softcap)
    ssmax_s = _check_positive("ssmax_s", ssmax_s)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else _check_positive("scale", scale)
    if window is not None and not causal and mask is None:
        causal_note = "window needs causal=True or a mask built with the window"
        raise ValueError(f"window={window!r} given without a positional mask: {causal_note}")
    for parameter, value in (("query", query_BHSD), ("key", key_BKSD), ("value", value_BKSD)):
        require_rank(value, 4, parameter)
    if sinks_H is not None:
        _check_sinks(sinks_H, num_heads, softcap=softcap is not None, ssmax=ssmax_s is not None)
    if (past_key_BKPD is None) != (past_value_BKPD is None):
        raise ValueError("past_key and past_value must be given together")

    if past_key_BKPD is not None:
        require_rank(past_key_BKPD, 4, "past_key")
        require_rank(past_value_BKPD, 4, "past_value")
        key_BKTD = g.op(
            "Concat", [past_key_BKPD, key_BKSD], {"axis": 2}, name=f"{name}/present_key"
        )
        value_BKTD = g.op(
            "Concat", [past_value_BKPD, value_BKSD], {"axis": 2}, name=f"{name}/present_value"
        )
    else:
        key_BKTD, value_BKTD = key_BKSD, value_BKSD

    bias = None
    if mask is not None:
        require_rank(mask, 4, "mask")
        is_bool = mask.type is not None and mask.type.dtype == ir.DataType.BOOL
        bias = bool_mask_to_bias(g, mask, name=f"{name}/mask_bias") if is_bool else mask
    if causal or window is not None:
        positional = position_bias(
            g, query_BHSD, key_BKTD, causal=causal, window=window, name=f"{name}/position_bias"
        )
        bias = positional if bias is None else g.op("Add", [bias, positional], name=f"{name}/bias")
    if bias is None:
        bias = position_bias(g, query_BHSD, key_BKTD, causal=False, name=f"{name}/no_bias")

    if sinks_H is not None:
        output = g.call(
            ScaledDotProductAttentionSinks,
            [query_BHSD, key_BKTD, value_BKTD, bias, sinks_H],
            {"scale": scale},
            name=name,
        )
        return output, key_BKTD, value_BKTD
    function = _VARIANTS[(softcap is not None, ssmax_s is not None)]
    attributes: dict[str, float] = {"scale": scale}
    if softcap is not None:
        attributes["softcap"] = softcap
    if ssmax_s is not None:
        attributes["ssmax_s"] = ssmax_s
    output = g.call(function, [query_BHSD, key_BKTD, value_BKTD, bias], attributes, name=name)
    return output, key_BKTD, value_BKTD


def multi_head_attention(g: GraphEmitter, query_BHSD, key_BHSD, value_BHSD, **kwargs):
    """Attention with one KV head per query head (``kv_heads = num_heads``); see SDPA emitter."""
    kwargs.setdefault("kv_heads", kwargs.get("num_heads"))
    if kwargs["kv_heads"] != kwargs.get("num_heads"):
        raise ValueError("multi-head attention needs kv_heads == num_heads")
    return scaled_dot_product_attention(g, query_BHSD, key_BHSD, value_BHSD, **kwargs)


def grouped_query_attention(g: GraphEmitter, query_BHSD, key_BKSD, value_BKSD, **kwargs):
    """Attention where ``kv_heads`` divides ``num_heads`` (a KV head serves H/Hkv query heads)."""
    return scaled_dot_product_attention(g, query_BHSD, key_BKSD, value_BKSD, **kwargs)


def multi_query_attention(g: GraphEmitter, query_BHSD, key_B1SD, value_B1SD, **kwargs):
    """Attention with a single KV head shared by every query head (``kv_heads = 1``)."""
    if kwargs.setdefault("kv_heads", 1) != 1:
        raise ValueError("multi-query attention needs kv_heads == 1")
    return scaled_dot_product_attention(g, query_BHSD, key_B1SD, value_B1SD, **kwargs)
