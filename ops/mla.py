"""Multi-head latent attention (MLA, DeepSeek-V2/V3) as one ``graphattn`` function call.

The block computes, from the normed hidden state ``x [B, S, C]`` and one layer's weights
(H heads, n = qk_nope_head_dim, p = qk_rope_head_dim, r = kv_lora_rank, v = v_head_dim)::

    q        = x W_q  or  RMSNorm(x W_q_a) W_q_b                   [B, S, H·(n + p)]
    q        = SplitHeads(q) = [q_nope | q_rope]                    [B, H, S, n], [B, H, S, p]
    q_rope   = RoPE(q_rope)                                         (halves or interleaved)
    c, k_r   = x W_kv_a = [c | k_r]                                 [B, S, r], [B, S, p]
    c        = RMSNorm(c);  k_r = RoPE(k_r) as one head
    latent   = Concat(past_latent, c) along T                       [B, T, r]   (cached)
    rope_key = Concat(past_rope_key, k_r) along T                   [B, T, p]   (cached)

``absorbed`` (the default; W_UK = ``k_up [H, n, r]``, W_UV = ``v_up [H, r, v]``)::

    q_lat    = q_nope @ W_UK                                        [B, H, S, r]
    out_lat  = softmax(scale [q_lat | q_rope]·[latent | rope_key]ᵀ + bias) latent
               (an MQA: one key head [latent | rope_key], one value head latent)
    out      = out_lat @ W_UV                                       [B, H, S, v]

``expanded`` (for comparison; K/V rebuilt from the whole cached latent at every call)::

    k_nope   = latent @ W_UKᵀ;  v = latent @ W_UV                   [B, H, T, n], [B, H, T, v]
    out      = softmax(scale [q_nope | q_rope]·[k_nope | rope_key]ᵀ + bias) v

then ``y = MergeHeads(out) W_o [B, S, C]``. Both forms compute the same thing: ``q_nope ·
k_nope = q_nope · (W_UK c) = (q_nope W_UK) · c``.

The body is generated per structure (query direct or low-rank, RoPE kind, form) and named
after it (``LatentAttention_q_lora_rope_interleaved_absorbed``, ...); dims, scale and the
norm epsilon are attributes of the call that the body reads (``ref_attr``).

Inputs by role, in this order (``input_roles`` lists them): ``x``, ``q_weight`` or
``q_a_weight, q_a_norm_weight, q_b_weight``, ``kv_a_weight, kv_a_norm_weight, k_up_weight,
v_up_weight, o_weight, cos, sin, bias, past_latent, past_rope_key``. Outputs: ``output [B, S,
C]``, ``present_latent [B, T, r]``, ``present_rope_key [B, T, p]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn.ops.attention import ScaledDotProductAttention, _check_positive
from graphattn.ops.domain import DOMAIN
from graphattn.ops.emit import GraphEmitter, require_rank
from graphattn.ops.heads import MergeHeads, SplitHeads
from graphattn.ops.norms import RMSNorm, _check_epsilon
from graphattn.ops.rotary import RotaryHalves, RotaryInterleaved

DIRECT_ROLES = ("q_weight",)
LOW_RANK_ROLES = ("q_a_weight", "q_a_norm_weight", "q_b_weight")
KV_ROLES = ("kv_a_weight", "kv_a_norm_weight", "k_up_weight", "v_up_weight", "o_weight")
ROLES = (*DIRECT_ROLES, *LOW_RANK_ROLES, *KV_ROLES)
FORMS = ("absorbed", "expanded")
ROPE_KINDS = ("halves", "interleaved")
PREFIX = "LatentAttention"

_FLOAT, _INT, _STRING = ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING
ATTRIBUTES = (
    ("num_heads", _INT),
    ("kv_lora_rank", _INT),
    ("qk_nope_head_dim", _INT),
    ("qk_rope_head_dim", _INT),
    ("v_head_dim", _INT),
    ("q_lora_rank", _INT),  # 0: queries straight from x W_q
    ("scale", _FLOAT),
    ("epsilon", _FLOAT),  # of the latent RMSNorms (kv_a_norm, q_a_norm)
    ("rope", _STRING),  # halves | interleaved
    ("form", _STRING),  # absorbed | expanded
    ("window", _INT),  # 0: none (already in the bias; recorded for the compiler)
    ("expand_from", _INT),  # absorbed: a call of at least this many tokens expands (0: never)
    ("input_roles", ir.AttributeType.STRINGS),
)
_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class LatentAttributes:
    """What one latent attention block computes (the call's attributes)."""

    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int
    scale: float
    epsilon: float
    rope: str = "interleaved"
    form: str = "absorbed"
    window: int = 0
    expand_from: int = 0
    input_roles: tuple[str, ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> LatentAttributes:
        """The attributes of a latent block call node."""
        values = {n: node.attributes[n].value for n, _ in ATTRIBUTES if n in node.attributes}
        values["input_roles"] = tuple(values.get("input_roles", ()))
        return cls(**values)

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name, _ in ATTRIBUTES}


def _ref(name: str, kind: ir.AttributeType, as_name: str) -> ir.Attr:
    return ir.RefAttr(as_name, name, kind)


def structure_name(attrs: LatentAttributes) -> str:
    """``LatentAttention`` plus the query kind, RoPE kind and form."""
    query = "q_lora" if attrs.q_lora_rank else "q_direct"
    hybrid = "_expand_prefill" if attrs.expand_from else ""
    return f"{PREFIX}_{query}_rope_{attrs.rope}_{attrs.form}{hybrid}"


def _body(attrs: LatentAttributes, roles: tuple[str, ...]) -> GraphEmitter:
    """The function body for one structure (see module docstring)."""
    b = GraphEmitter("body")
    inputs = {role: b.input(role, None, None) for role in roles}

    def width(attribute: str, label: str) -> ir.Value:
        """A 1-D int64 [value of the call's ``attribute``]."""
        scalar = b.op("Constant", [], {"value_int": _ref(attribute, _INT, "value_int")}, name=label)
        return b.op(
            "Unsqueeze", [scalar, b.constant(f"{label}/axis", np.array([0]))], name=f"{label}/1d"
        )

    axes: dict[int, ir.Value] = {}

    def axis(k: int) -> ir.Value:
        if k not in axes:
            axes[k] = b.constant(f"axis_{k}", np.array([k], np.int64))
        return axes[k]

    zero = b.constant("start", np.array([0], np.int64))
    end = b.constant("end", np.array([_MAX], np.int64))
    epsilon = {"epsilon": _ref("epsilon", _FLOAT, "epsilon")}
    x = inputs["x"]
    if attrs.q_lora_rank:
        q_a = b.op("MatMul", [x, inputs["q_a_weight"]], name="q_a_proj")
        q_a = b.call(RMSNorm, [q_a, inputs["q_a_norm_weight"]], epsilon, name="q_a_norm")
        q = b.op("MatMul", [q_a, inputs["q_b_weight"]], name="q_b_proj")
    else:
        q = b.op("MatMul", [x, inputs["q_weight"]], name="q_proj")
    q = b.call(SplitHeads, [q], {"heads": _ref("num_heads", _INT, "heads")}, name="q_heads")
    nope = width("qk_nope_head_dim", "nope_width")
    q_nope = b.op("Slice", [q, zero, nope, axis(3)], name="q_nope")
    q_rope = b.op("Slice", [q, nope, end, axis(3)], name="q_rope")
    rotary = RotaryInterleaved if attrs.rope == "interleaved" else RotaryHalves
    cos, sin = inputs["cos"], inputs["sin"]
    q_rope = b.call(rotary, [q_rope, cos, sin], name="q_rotary")

    kv = b.op("MatMul", [x, inputs["kv_a_weight"]], name="kv_a_proj")
    rank = width("kv_lora_rank", "latent_width")
    c = b.op("Slice", [kv, zero, rank, axis(2)], name="latent_raw")
    c = b.call(RMSNorm, [c, inputs["kv_a_norm_weight"]], epsilon, name="kv_a_norm")
    k_rope = b.op("Slice", [kv, rank, end, axis(2)], name="rope_key_raw")
    k_rope = b.op("Unsqueeze", [k_rope, axis(1)], name="rope_key_head")  # [B, 1, S, p]
    k_rope = b.call(rotary, [k_rope, cos, sin], name="k_rotary")
    k_rope = b.op("Squeeze", [k_rope, axis(1)], name="rope_key")
    latent = b.op("Concat", [inputs["past_latent"], c], {"axis": 1}, name="present_latent")
    rope_key = b.op(
        "Concat", [inputs["past_rope_key"], k_rope], {"axis": 1}, name="present_rope_key"
    )
    latent_B1TR = b.op("Unsqueeze", [latent, axis(1)], name="latent_head")
    rope_key_B1TP = b.op("Unsqueeze", [rope_key, axis(1)], name="rope_key_head_all")
    scale = {"scale": _ref("scale", _FLOAT, "scale")}
    bias = inputs["bias"]

    def absorbed(e: GraphEmitter, p: str = "") -> ir.Value:
        q_latent = e.op("MatMul", [q_nope, inputs["k_up_weight"]], name=f"{p}q_absorb")
        query = e.op("Concat", [q_latent, q_rope], {"axis": -1}, name=f"{p}query")
        key = e.op("Concat", [latent_B1TR, rope_key_B1TP], {"axis": -1}, name=f"{p}key")
        mixed = e.call(
            ScaledDotProductAttention, [query, key, latent_B1TR, bias], scale, name=f"{p}sdpa"
        )
        return e.op("MatMul", [mixed, inputs["v_up_weight"]], name=f"{p}v_absorb")

    def expanded(e: GraphEmitter, p: str = "") -> ir.Value:
        k_up_T = e.op("Transpose", [inputs["k_up_weight"]], {"perm": [0, 2, 1]}, name=f"{p}k_up_T")
        k_nope = e.op("MatMul", [latent_B1TR, k_up_T], name=f"{p}k_nope")  # [B, H, T, n]
        value = e.op("MatMul", [latent_B1TR, inputs["v_up_weight"]], name=f"{p}value")
        k_shape = e.op("Shape", [k_nope], name=f"{p}k_shape")
        bht = e.op("Slice", [k_shape, zero, axis(3)], name=f"{p}k_bht")
        one = e.constant("one", np.array([1], np.int64))
        heads_shape = e.op("Concat", [bht, one], {"axis": 0}, name=f"{p}rope_key_shape")
        rope_key_BHTP = e.op("Expand", [rope_key_B1TP, heads_shape], name=f"{p}rope_key_heads")
        key = e.op("Concat", [k_nope, rope_key_BHTP], {"axis": -1}, name=f"{p}key")
        query = e.op("Concat", [q_nope, q_rope], {"axis": -1}, name=f"{p}query")
        return e.call(ScaledDotProductAttention, [query, key, value, bias], scale, name=f"{p}sdpa")

    if attrs.form == "expanded":
        out = expanded(b)
    elif not attrs.expand_from:
        out = absorbed(b)
    else:  # prefill of at least expand_from tokens: expanded (fewer FLOPs), else absorbed
        branches = {}
        for label, compute in (("then_branch", expanded), ("else_branch", absorbed)):
            e = GraphEmitter(label)
            prefix = "expanded/" if compute is expanded else "absorbed/"
            e.output(compute(e, prefix), f"{prefix}out", ir.DataType.UNDEFINED)
            e.graph.outputs[-1].type = None
            for function in e.functions:
                b.define(function)
            branches[label] = ir.Attr(label, ir.AttributeType.GRAPH, e.graph)
        length = b.op(
            "Slice",
            [b.op("Shape", [x], name="x_shape"), axis(1), b.constant("two", np.array([2]))],
            name="query_length",
        )
        threshold = width("expand_from", "expand_from")
        use_expanded = b.op("GreaterOrEqual", [length, threshold], name="use_expanded")
        scalar = b.op("Squeeze", [use_expanded, zero], name="use_expanded/scalar")
        out = b.op("If", [scalar], branches, name="prefill_or_decode")
    merged = b.call(MergeHeads, [out], name="merge_heads")
    output = b.op("MatMul", [merged, inputs["o_weight"]], name="o_proj")
    for value_out, label in (
        (output, "output"),
        (latent, "present_latent"),
        (rope_key, "present_rope_key"),
    ):
        b.output(value_out, label, ir.DataType.UNDEFINED)
        b.graph.outputs[-1].type = None
    return b


def _static_shape(value: ir.Value) -> tuple | None:
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def _check_weight(weights: Mapping[str, ir.Value], role: str, expected: tuple) -> None:
    shape = _static_shape(weights[role])
    if shape is None:
        return
    if len(shape) != len(expected) or any(
        s is not None and e is not None and s != e for s, e in zip(shape, expected)
    ):
        raise ValueError(
            f"latent attention: {role} must have shape {list(expected)}, got {list(shape)}"
        )


def latent_attention_block(
    g: GraphEmitter,
    x_BSC: ir.Value,
    weights: Mapping[str, ir.Value],
    *,
    bias_B1ST: ir.Value,
    past_latent_BPR: ir.Value,
    past_rope_key_BPP: ir.Value,
    cos_sin: tuple[ir.Value, ir.Value],
    num_heads: int,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    q_lora_rank: int | None = None,
    scale: float | None = None,
    epsilon: float = 1e-6,
    rope: str = "interleaved",
    form: str = "absorbed",
    window: int | None = None,
    expand_from: int = 0,
    name: str,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Emit one latent attention call; returns ``(output [B, S, C], present_latent [B, T,
    kv_lora_rank], present_rope_key [B, T, qk_rope_head_dim])``.

    ``weights``: ``q_weight [C, H·(n+p)]`` or (with ``q_lora_rank``) ``q_a_weight [C, q_lora]``,
    ``q_a_norm_weight [q_lora]``, ``q_b_weight [q_lora, H·(n+p)]``; ``kv_a_weight [C, r + p]``,
    ``kv_a_norm_weight [r]``, ``k_up_weight [H, n, r]``, ``v_up_weight [H, r, v]``,
    ``o_weight [H·v, C]``. ``cos_sin [B, S, p / 2]``; ``bias_B1ST`` the additive mask;
    ``scale`` default ``1/sqrt(n + p)``. ``expand_from`` (absorbed form): a call of at least
    that many tokens (a prefill) computes the expanded form instead, which needs fewer FLOPs
    there (:func:`expand_threshold`); 0: always absorbed."""
    for parameter, value in (
        ("num_heads", num_heads),
        ("kv_lora_rank", kv_lora_rank),
        ("qk_nope_head_dim", qk_nope_head_dim),
        ("qk_rope_head_dim", qk_rope_head_dim),
        ("v_head_dim", v_head_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"latent attention {parameter} must be a positive int, got {value!r}")
    if qk_rope_head_dim % 2:
        raise ValueError(f"latent attention qk_rope_head_dim must be even, got {qk_rope_head_dim}")
    if q_lora_rank is not None and (
        isinstance(q_lora_rank, bool) or not isinstance(q_lora_rank, int) or q_lora_rank < 1
    ):
        raise ValueError(
            f"latent attention q_lora_rank must be a positive int or None, got {q_lora_rank!r}"
        )
    if form not in FORMS:
        raise ValueError(f"latent attention form must be one of {', '.join(FORMS)}, got {form!r}")
    if rope not in ROPE_KINDS:
        raise ValueError(
            f"latent attention rope must be one of {', '.join(ROPE_KINDS)}, got {rope!r}"
        )
    if isinstance(expand_from, bool) or not isinstance(expand_from, int) or expand_from < 0:
        raise ValueError(f"latent attention expand_from must be an int >= 0, got {expand_from!r}")
    if expand_from and form != "absorbed":
        raise ValueError("latent attention expand_from goes with the absorbed form")
    if cos_sin is None:
        raise ValueError("latent attention needs cos_sin: RoPE turns the qk_rope_head_dim channels")
    head_dim = qk_nope_head_dim + qk_rope_head_dim
    scale = 1.0 / float(np.sqrt(head_dim)) if scale is None else _check_positive("scale", scale)
    unknown = set(weights) - set(ROLES)
    if unknown:
        raise ValueError(f"latent attention: unknown weight roles {sorted(unknown)}")
    query_roles = LOW_RANK_ROLES if q_lora_rank else DIRECT_ROLES
    other = DIRECT_ROLES if q_lora_rank else LOW_RANK_ROLES
    extra = [r for r in other if r in weights]
    if extra:
        kind = "with q_lora_rank" if q_lora_rank else "without q_lora_rank"
        raise ValueError(f"latent attention {kind}: unexpected weights {extra}")
    missing = [r for r in (*query_roles, *KV_ROLES) if r not in weights]
    if missing:
        raise ValueError(f"latent attention: missing weights {missing}")
    require_rank(x_BSC, 3, "x")
    require_rank(past_latent_BPR, 3, "past_latent")
    require_rank(past_rope_key_BPP, 3, "past_rope_key")
    h, n, p, r, v = num_heads, qk_nope_head_dim, qk_rope_head_dim, kv_lora_rank, v_head_dim
    expected = {
        "q_weight": (None, h * head_dim),
        "q_a_weight": (None, q_lora_rank),
        "q_a_norm_weight": (q_lora_rank,),
        "q_b_weight": (q_lora_rank, h * head_dim),
        "kv_a_weight": (None, r + p),
        "kv_a_norm_weight": (r,),
        "k_up_weight": (h, n, r),
        "v_up_weight": (h, r, v),
        "o_weight": (h * v, None),
    }
    for role in (*query_roles, *KV_ROLES):
        _check_weight(weights, role, expected[role])
    roles = ("x", *(role for role in ROLES if role in weights), "cos", "sin", "bias")
    roles += ("past_latent", "past_rope_key")
    values = [x_BSC, *(weights[role] for role in roles[1:-5]), *cos_sin, bias_B1ST]
    values += [past_latent_BPR, past_rope_key_BPP]
    attrs = LatentAttributes(
        num_heads=h,
        kv_lora_rank=r,
        qk_nope_head_dim=n,
        qk_rope_head_dim=p,
        v_head_dim=v,
        q_lora_rank=int(q_lora_rank or 0),
        scale=scale,
        epsilon=_check_epsilon(epsilon),
        rope=rope,
        form=form,
        window=int(window or 0),
        expand_from=expand_from,
        input_roles=roles,
    )
    function_name = structure_name(attrs)
    body = _body(attrs, roles)
    declared = [ir.Attr(n_, kind, None) for n_, kind in ATTRIBUTES]
    g.define(body.function_body(function_name, declared), body.functions)
    call_attrs = {
        n_: ir.Attr(n_, kind, list(val) if isinstance(val, tuple) else val)
        for (n_, kind), val in zip(ATTRIBUTES, attrs.as_dict().values())
    }
    return g.call_defined(
        function_name,
        values,
        call_attrs,
        name=name,
        outputs=("output", "present_latent", "present_rope_key"),
    )


def expand_threshold(kv_lora_rank: int, qk_nope_head_dim: int, v_head_dim: int) -> int:
    """The query length from which the expanded form needs fewer multiply-adds than the
    absorbed one (0: never). Per head and key, absorbed costs ``S·(2r + p)`` (scores over
    ``[latent | rope key]``, mix over the latent); expanded ``r·(n + v)`` (rebuilding k_nope and
    v) plus ``S·(n + p + v)``; so expanded wins once ``S·(2r − n − v) > r·(n + v)``."""
    r, n, v = kv_lora_rank, qk_nope_head_dim, v_head_dim
    if 2 * r <= n + v:
        return 0
    return r * (n + v) // (2 * r - n - v) + 1


def is_latent_block(node: ir.Node) -> bool:
    """Whether ``node`` calls a latent attention block function."""
    return node.domain == DOMAIN and node.op_type.startswith(PREFIX)
