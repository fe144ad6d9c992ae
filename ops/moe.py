"""A mixture-of-experts feed-forward block as one ``graphattn`` function call.

The block computes, from the normed hidden state ``x [..., C]`` (flattened to N tokens) and one
layer's weights (E experts of width I, k chosen per token)::

    logits  = x W_router (+ b_router)                                [N, E]
    scores  = softmax(logits) | sigmoid(logits)                      [N, E]
    choice  = scores (+ score_bias)                                  (selection only)
    groups  : choice [N, G, E/G] → group score (sum of top 2 | max) → keep the best
              topk_groups groups, the other experts' choice = -inf
    chosen  = TopK(choice, k)                                        [N, k] indices
    gains   = scores[chosen] (/ their sum when normalize) · scaling  [N, k]
    W       = ScatterElements(zeros [N, E], chosen, gains)           [N, E] (sparse)
    y       = Σ_e W[:, e] · expert_e(x) + shared(x) (· σ(x W_shared_gate))

Each expert is gated: ``down(act(x W_gate + b) * (x W_up + b)) + b`` or, with
``swiglu_limit`` (GPT-OSS), ``g = min(gate, L)``, ``u = clip(up, ±L)``, ``(u + 1)·g·σ(α g)``.

Two expert computations (attribute ``form``; both exact, chosen by measurement, see README):

- ``routed``: per expert, the rows of the tokens routed to it (``NonZero`` of ``W[:, e]``),
  gathered, through its MLP, weighted, placed in zeros (``ScatterND``) and added up:
  each expert reads its weights once and computes only its tokens (k/E of the dense work);
- ``dense``: every expert on every token, weighted by ``W[:, e]`` (zero for the others): no
  gather/scatter, E/k times the arithmetic and every expert's weights read at each call.

Every expert weight is its own 2-D ``[in, out]`` MatMul initializer, so the int4/int8 pass
(MatMulNBits / blocked DequantizeLinear) quantizes experts like any projection. The router is
a ``Gemm`` on the 2-D tokens: neither MatMul packing nor the weight quantizers take a Gemm
without ``transB``, so routing stays in the float type in every precision (a quantized router
would move near-tied choices).

The body is generated per structure (score kind, expert count, groups, which biases and
shared parts exist, activation, form) and named after it (``MixtureOfExperts_softmax_e8_
norm_silu_routed``, ...); ``top_k``, ``topk_groups``, ``scaling``, ``swiglu_limit`` and
``swiglu_alpha`` are call attributes the body reads (``ref_attr``). All attributes are on the
call, so the compiler lowers a block by reading this one node (:mod:`graphattn.compiler.moe`).

Inputs by role (``input_roles`` lists the present ones, in this order): ``x``,
``router.weight [C, E]``, ``router.bias [E]``, ``router.score_bias [E]``, per expert
``experts.{e}.gate_weight [C, I]``, ``.gate_bias``, ``.up_weight [C, I]``, ``.up_bias``,
``.down_weight [I, C]``, ``.down_bias``; ``shared.gate_weight``, ``shared.gate_bias``,
``shared.up_weight``, ``shared.up_bias``, ``shared.down_weight``, ``shared.down_bias``,
``shared_gate.weight [C, 1]``. Output: ``output`` with the shape of ``x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphattn.ops.domain import DOMAIN
from graphattn.ops.emit import GraphEmitter

PREFIX = "MixtureOfExperts"
FORMS = ("routed", "dense")
DEFAULT_FORM = "routed"
SCORES = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
ROUTER_ROLES = ("router.weight", "router.bias", "router.score_bias")
MLP_PARTS = ("gate_weight", "gate_bias", "up_weight", "up_bias", "down_weight", "down_bias")
SHARED_GATE = "shared_gate.weight"

_FLOAT, _INT, _STRING = ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING
ATTRIBUTES = (
    ("num_experts", _INT),
    ("top_k", _INT),
    ("scores", _STRING),  # softmax | sigmoid
    ("normalize", _INT),
    ("scaling", _FLOAT),
    ("groups", _INT),
    ("topk_groups", _INT),
    ("group_score", _STRING),  # top2_sum | max
    ("activation", _STRING),
    ("swiglu_limit", _FLOAT),  # 0: plain gated activation
    ("swiglu_alpha", _FLOAT),
    ("shared", _INT),
    ("shared_gate", _INT),
    ("form", _STRING),  # routed | dense
    ("input_roles", ir.AttributeType.STRINGS),
)
_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class MoeAttributes:
    """What one MoE block computes (the call's attributes)."""

    num_experts: int
    top_k: int
    scores: str = "softmax"
    normalize: int = 0
    scaling: float = 1.0
    groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    activation: str = "silu"
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702
    shared: int = 0
    shared_gate: int = 0
    form: str = DEFAULT_FORM
    input_roles: tuple[str, ...] = ()

    @classmethod
    def of(cls, node: ir.Node) -> MoeAttributes:
        """The attributes of a MoE block call node."""
        values = {n: node.attributes[n].value for n, _ in ATTRIBUTES if n in node.attributes}
        values["input_roles"] = tuple(values.get("input_roles", ()))
        return cls(**values)

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name, _ in ATTRIBUTES}

    def biases(self, part: str) -> bool:
        """Whether the routed experts (``experts``) or the shared one (``shared``) have biases."""
        return any(r.startswith(f"{part}.") and r.endswith("_bias") for r in self.input_roles)


def _ref(name: str, kind: ir.AttributeType, as_name: str) -> ir.Attr:
    return ir.RefAttr(as_name, name, kind)


def structure_name(attrs: MoeAttributes) -> str:
    """``MixtureOfExperts`` plus what the body is built from."""
    parts = [PREFIX, attrs.scores, f"e{attrs.num_experts}"]
    if attrs.groups > 1:
        parts.append(f"g{attrs.groups}_{attrs.group_score}")
    roles = set(attrs.input_roles)
    if "router.bias" in roles:
        parts.append("router_bias")
    if "router.score_bias" in roles:
        parts.append("score_bias")
    if attrs.normalize:
        parts.append("norm")
    parts.append("clamped_swiglu" if attrs.swiglu_limit else attrs.activation)
    if attrs.biases("experts"):
        parts.append("biased")
    if attrs.shared:
        parts.append("shared_gated" if attrs.shared_gate else "shared")
        if attrs.biases("shared"):
            parts.append("shared_biased")
    parts.append(attrs.form)
    return "_".join(parts)


class _Body:
    """Builds one structure's function body."""

    def __init__(self, attrs: MoeAttributes) -> None:
        self.a = attrs
        self.b = GraphEmitter("body")
        self.inputs = {role: self.b.input(role, None, None) for role in attrs.input_roles}
        self._constants: dict[str, ir.Value] = {}
        self._swiglu: tuple[ir.Value, ...] | None = None

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        if name not in self._constants:
            self._constants[name] = self.b.constant(name, array)
        return self._constants[name]

    def attr_scalar(self, attribute: str, kind: ir.AttributeType, like: ir.Value | None, label):
        """The call's ``attribute`` as a tensor: int → 1-D int64 ``[value]``; float → a scalar
        of ``like``'s type."""
        b = self.b
        if kind == _INT:
            value = b.op(
                "Constant", [], {"value_int": _ref(attribute, _INT, "value_int")}, name=label
            )
            return b.op(
                "Unsqueeze", [value, self.const("axis0", np.array([0]))], name=f"{label}/1d"
            )
        value = b.op(
            "Constant", [], {"value_float": _ref(attribute, _FLOAT, "value_float")}, name=label
        )
        return b.op("CastLike", [value, like], name=f"{label}/like")

    def linear(self, x: ir.Value, prefix: str, part: str, label: str) -> ir.Value:
        y = self.b.op("MatMul", [x, self.inputs[f"{prefix}.{part}_weight"]], name=label)
        if f"{prefix}.{part}_bias" in self.inputs:
            y = self.b.op("Add", [y, self.inputs[f"{prefix}.{part}_bias"]], name=f"{label}/bias")
        return y

    def expert(self, x: ir.Value, prefix: str, label: str, clamped: bool) -> ir.Value:
        """One gated expert on ``x [M, C]`` → ``[M, C]``."""
        b = self.b
        gate = self.linear(x, prefix, "gate", f"{label}/gate")
        up = self.linear(x, prefix, "up", f"{label}/up")
        if clamped:
            if self._swiglu is None:
                limit = self.attr_scalar("swiglu_limit", _FLOAT, x, "swiglu_limit")
                neg_limit = b.op("Neg", [limit], name="swiglu_limit/neg")
                alpha = self.attr_scalar("swiglu_alpha", _FLOAT, x, "swiglu_alpha")
                one = b.op(
                    "CastLike", [self.const("one", np.array(1.0, np.float32)), x], name="one_like"
                )
                self._swiglu = (limit, neg_limit, alpha, one)
            limit, neg_limit, alpha, one = self._swiglu
            gate = b.op("Min", [gate, limit], name=f"{label}/gate_clamp")
            up = b.op("Clip", [up, neg_limit, limit], name=f"{label}/up_clip")
            scaled = b.op("Mul", [gate, alpha], name=f"{label}/alpha_gate")
            glu = b.op(
                "Mul",
                [gate, b.op("Sigmoid", [scaled], name=f"{label}/sigmoid")],
                name=f"{label}/glu",
            )
            up1 = b.op("Add", [up, one], name=f"{label}/up_plus_one")
            hidden = b.op("Mul", [up1, glu], name=f"{label}/gated")
        else:
            act = _activation(b, self.a.activation, gate, f"{label}/act")
            hidden = b.op("Mul", [act, up], name=f"{label}/gated")
        return self.linear(hidden, prefix, "down", f"{label}/down")

    def build(self) -> GraphEmitter:
        a, b, inp = self.a, self.b, self.inputs
        x_in = inp["x"]
        shape = b.op("Shape", [x_in], name="x_shape")
        width = b.op("Shape", [x_in], {"start": -1}, name="x_width")
        flat = b.op(
            "Concat",
            [self.const("minus_one", np.array([-1])), width],
            {"axis": 0},
            name="flat_shape",
        )
        x = b.op("Reshape", [x_in, flat], name="x_NC")

        router_inputs = [x, inp["router.weight"]]
        if "router.bias" in inp:
            router_inputs.append(inp["router.bias"])
        logits = b.op("Gemm", router_inputs, name="router")  # not packed nor quantized
        if a.scores == "softmax":
            scores = b.op("Softmax", [logits], {"axis": -1}, name="scores")
        else:
            scores = b.op("Sigmoid", [logits], name="scores")
        choice = scores
        if "router.score_bias" in inp:
            choice = b.op("Add", [scores, inp["router.score_bias"]], name="choice")
        if a.groups > 1:
            choice = self.group_limit(choice)
        k = self.attr_scalar("top_k", _INT, None, "top_k")
        _, chosen = b.op(
            "TopK", [choice, k], {"axis": -1}, name="topk", outputs=("values", "indices")
        )
        gains = b.op("GatherElements", [scores, chosen], {"axis": 1}, name="gains")
        if a.normalize:
            total = b.op(
                "ReduceSum", [gains, self.const("axis_last", np.array([-1]))], name="gain_sum"
            )
            gains = b.op("Div", [gains, total], name="gains_normalized")
        scaling = self.attr_scalar("scaling", _FLOAT, gains, "scaling")
        gains = b.op("Mul", [gains, scaling], name="gains_scaled")
        zeros_NE = b.op(
            "CastLike",
            [
                b.op(
                    "ConstantOfShape",
                    [b.op("Shape", [scores], name="scores_shape")],
                    name="zeros_NE_f32",
                ),
                scores,
            ],
            name="zeros_NE",
        )
        weights_NE = b.op(
            "ScatterElements", [zeros_NE, chosen, gains], {"axis": 1}, name="routing_weights"
        )

        clamped = bool(a.swiglu_limit)
        if a.form == "routed":
            out = None
            zeros_NC = b.op(
                "CastLike",
                [
                    b.op(
                        "ConstantOfShape",
                        [b.op("Shape", [x], name="x_NC_shape")],
                        name="zeros_NC_f32",
                    ),
                    x,
                ],
                name="zeros_NC",
            )
            flat_rows = self.const("rows_shape", np.array([-1]))
            for e in range(a.num_experts):
                s = f"expert.{e}"
                w_N = b.op(
                    "Gather",
                    [weights_NE, self.const(f"e{e}", np.array(e))],
                    {"axis": 1},
                    name=f"{s}/weight",
                )
                rows = b.op(
                    "Reshape",
                    [b.op("NonZero", [w_N], name=f"{s}/nonzero"), flat_rows],
                    name=f"{s}/rows",
                )
                x_e = b.op("Gather", [x, rows], {"axis": 0}, name=f"{s}/tokens")
                y_e = self.expert(x_e, f"experts.{e}", s, clamped)
                gain = b.op("Gather", [w_N, rows], {"axis": 0}, name=f"{s}/gain")
                gain = b.op(
                    "Unsqueeze",
                    [gain, self.const("axis_last", np.array([-1]))],
                    name=f"{s}/gain_col",
                )
                y_e = b.op("Mul", [y_e, gain], name=f"{s}/weighted")
                index = b.op(
                    "Unsqueeze", [rows, self.const("axis_last", np.array([-1]))], name=f"{s}/index"
                )
                # ScatterND without reduction (ORT CPU has no float16 scatter-add): the
                # expert's rows placed into zeros, then added
                placed = b.op("ScatterND", [zeros_NC, index, y_e], name=f"{s}/placed")
                out = placed if out is None else b.op("Add", [out, placed], name=f"{s}/add")
        else:
            out = None
            for e in range(a.num_experts):
                s = f"expert.{e}"
                y_e = self.expert(x, f"experts.{e}", s, clamped)
                gain = b.op(
                    "Gather",
                    [weights_NE, self.const(f"e{e}_1d", np.array([e]))],
                    {"axis": 1},
                    name=f"{s}/gain",
                )
                y_e = b.op("Mul", [y_e, gain], name=f"{s}/weighted")
                out = y_e if out is None else b.op("Add", [out, y_e], name=f"{s}/add")
        if a.shared:
            y_s = self.expert(x, "shared", "shared", False)
            if a.shared_gate:
                gate = b.op("MatMul", [x, inp[SHARED_GATE]], name="shared_gate")
                y_s = b.op(
                    "Mul",
                    [y_s, b.op("Sigmoid", [gate], name="shared_gate/sigmoid")],
                    name="shared/sigmoid_gated",
                )
            out = b.op("Add", [out, y_s], name="with_shared")
        output = b.op("Reshape", [out, shape], name="output")
        b.output(output, "output", ir.DataType.UNDEFINED)
        b.graph.outputs[-1].type = None
        return b

    def group_limit(self, choice: ir.Value) -> ir.Value:
        """``choice [N, E]`` with the experts outside the best ``topk_groups`` groups at -inf."""
        a, b = self.a, self.b
        grouped = b.op(
            "Reshape",
            [choice, self.const("group_shape", np.array([0, a.groups, -1]))],
            name="choice_NGS",
        )
        if a.group_score == "top2_sum":
            top2, _ = b.op(
                "TopK",
                [grouped, self.const("two", np.array([2]))],
                {"axis": -1},
                name="group_top2",
                outputs=("values", "indices"),
            )
            group_scores = b.op(
                "ReduceSum",
                [top2, self.const("axis_last", np.array([-1]))],
                {"keepdims": 0},
                name="group_scores",
            )
        else:
            group_scores = b.op(
                "ReduceMax",
                [grouped, self.const("axis_last", np.array([-1]))],
                {"keepdims": 0},
                name="group_scores",
            )
        keep = self.attr_scalar("topk_groups", _INT, None, "topk_groups")
        _, kept = b.op(
            "TopK",
            [group_scores, keep],
            {"axis": -1},
            name="group_topk",
            outputs=("values", "indices"),
        )
        ones = b.op(
            "CastLike",
            [
                b.op(
                    "GreaterOrEqual", [kept, self.const("zero_i64", np.array(0))], name="kept_true"
                ),
                group_scores,
            ],
            name="kept_ones",
        )
        zeros = b.op("Sub", [group_scores, group_scores], name="group_zeros")
        mask_NG = b.op("ScatterElements", [zeros, kept, ones], {"axis": 1}, name="group_mask")
        mask = b.op(
            "Unsqueeze", [mask_NG, self.const("axis_last", np.array([-1]))], name="group_mask_NG1"
        )
        mask = b.op(
            "Expand", [mask, b.op("Shape", [grouped], name="grouped_shape")], name="group_mask_NGS"
        )
        mask = b.op(
            "Reshape", [mask, b.op("Shape", [choice], name="choice_shape")], name="expert_mask"
        )
        keep_bool = b.op("Cast", [mask], {"to": ir.DataType.BOOL}, name="expert_kept")  # 0/1
        minus_inf = b.op(
            "CastLike",
            [self.const("minus_inf", np.array(-np.inf, np.float32)), choice],
            name="minus_inf_like",
        )
        return b.op("Where", [keep_bool, choice, minus_inf], name="choice_in_groups")


def _activation(b: GraphEmitter, kind: str, x: ir.Value, name: str) -> ir.Value:
    if kind == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x], name=f"{name}/sigmoid")], name=name)
    if kind in ("gelu", "gelu_tanh"):
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        return b.op("Gelu", [x], {"approximate": approximate}, name=name)
    relu = b.op("Relu", [x], name=name if kind == "relu" else f"{name}/relu")
    return relu if kind == "relu" else b.op("Mul", [relu, relu], name=name)


def _roles(num_experts: int, weights: Mapping[str, ir.Value]) -> tuple[str, ...]:
    order = ["x", *ROUTER_ROLES]
    for e in range(num_experts):
        order += [f"experts.{e}.{p}" for p in MLP_PARTS]
    order += [f"shared.{p}" for p in MLP_PARTS] + [SHARED_GATE]
    return tuple(r for r in order if r == "x" or r in weights)


def _check(weights: Mapping[str, ir.Value], num_experts: int) -> tuple[bool, bool]:
    """Validate the roles; returns (shared expert, shared gate)."""
    known = set(ROUTER_ROLES) | {SHARED_GATE}
    known |= {f"experts.{e}.{p}" for e in range(num_experts) for p in MLP_PARTS}
    known |= {f"shared.{p}" for p in MLP_PARTS}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"moe: unknown weight roles {unknown} (num_experts={num_experts})")
    required = ["router.weight"]
    required += [
        f"experts.{e}.{p}_weight" for e in range(num_experts) for p in ("gate", "up", "down")
    ]
    missing = [r for r in required if r not in weights]
    if missing:
        raise ValueError(f"moe: missing weights {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    bias_sets = {
        tuple(p for p in MLP_PARTS if p.endswith("bias") and f"experts.{e}.{p}" in weights)
        for e in range(num_experts)
    }
    if len(bias_sets) > 1:
        raise ValueError(f"moe: experts differ in which biases they have: {sorted(bias_sets)}")
    shared_roles = [f"shared.{p}" for p in ("gate_weight", "up_weight", "down_weight")]
    shared = [r in weights for r in shared_roles]
    if any(shared) and not all(shared):
        raise ValueError(
            f"moe: the shared expert needs all of {shared_roles}, the plan has only"
            f" {[r for r, present in zip(shared_roles, shared) if present]}"
        )
    if SHARED_GATE in weights and not all(shared):
        raise ValueError(f"moe: {SHARED_GATE} without a shared expert")
    router = weights["router.weight"]
    if router.shape is not None and len(router.shape) == 2 and isinstance(router.shape[1], int):
        if router.shape[1] != num_experts:
            raise ValueError(
                f"moe: router.weight has {router.shape[1]} columns, num_experts={num_experts}"
            )
    return all(shared), SHARED_GATE in weights


def moe_block(
    g: GraphEmitter,
    x: ir.Value,
    weights: Mapping[str, ir.Value],
    *,
    num_experts: int,
    top_k: int,
    scores: str = "softmax",
    normalize: bool = False,
    scaling: float = 1.0,
    groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
    activation: str = "silu",
    swiglu_limit: float | None = None,
    swiglu_alpha: float = 1.702,
    form: str = DEFAULT_FORM,
    name: str,
) -> ir.Value:
    """Emit one MoE call on ``x [..., C]``; returns ``y`` of the same shape. ``weights`` by
    role (module docstring); the parameters are :class:`graphattn.spec.MoeSpec`'s."""
    for parameter, value in (
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("groups", groups),
        ("topk_groups", topk_groups),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"moe {parameter} must be a positive int, got {value!r}")
    if top_k > num_experts:
        raise ValueError(f"moe top_k={top_k} exceeds num_experts={num_experts}")
    if num_experts % groups or topk_groups > groups:
        raise ValueError(
            f"moe groups={groups} must divide num_experts={num_experts} and be at least"
            f" topk_groups={topk_groups}"
        )
    if groups > 1 and group_score == "top2_sum" and num_experts // groups < 2:
        raise ValueError("moe group_score top2_sum needs at least 2 experts per group")
    for parameter, value, allowed in (
        ("scores", scores, SCORES),
        ("group_score", group_score, GROUP_SCORES),
        ("activation", activation, ACTIVATIONS),
        ("form", form, FORMS),
    ):
        if value not in allowed:
            raise ValueError(f"moe {parameter} must be one of {', '.join(allowed)}, got {value!r}")
    if swiglu_limit is not None and not swiglu_limit > 0:
        raise ValueError(f"moe swiglu_limit must be positive or None, got {swiglu_limit!r}")
    if not scaling > 0:
        raise ValueError(f"moe scaling must be positive, got {scaling!r}")
    shared, shared_gate = _check(weights, num_experts)
    roles = _roles(num_experts, weights)
    attrs = MoeAttributes(
        num_experts=num_experts,
        top_k=top_k,
        scores=scores,
        normalize=int(bool(normalize)),
        scaling=float(scaling),
        groups=groups,
        topk_groups=topk_groups,
        group_score=group_score,
        activation=activation,
        swiglu_limit=float(swiglu_limit or 0.0),
        swiglu_alpha=float(swiglu_alpha),
        shared=int(shared),
        shared_gate=int(shared_gate),
        form=form,
        input_roles=roles,
    )
    function_name = structure_name(attrs)
    body = _Body(attrs).build()
    declared = [ir.Attr(n, kind, None) for n, kind in ATTRIBUTES]
    g.define(body.function_body(function_name, declared), body.functions)
    call_attrs = {
        n: ir.Attr(n, kind, list(v) if isinstance(v, tuple) else v)
        for (n, kind), v in zip(ATTRIBUTES, attrs.as_dict().values())
    }
    values = [x, *(weights[r] for r in roles[1:])]
    return g.call_defined(function_name, values, call_attrs, name=name)


def is_moe_block(node: ir.Node) -> bool:
    """Whether ``node`` calls a MoE block function."""
    return node.domain == DOMAIN and node.op_type.startswith(PREFIX)
