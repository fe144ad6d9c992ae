"""Independent NumPy reference of a mixture-of-experts block (test side only), float64.

Written from the definitions in ``graphattn.spec.MoeSpec``'s docstring, one token at a time,
sharing no code with the package: the spec is a plain mapping (or keyword arguments) with the
MoeSpec field names plus ``activation``, and the weights are keyed by the graph-layout roles
under ``layers.{i}.mlp.`` (matrices ``[in, out]``):

- ``router.weight [C, E]``, optional ``router.bias [E]``, optional ``router.score_bias [E]``;
- ``experts.{e}.gate_weight [C, I]``, ``experts.{e}.up_weight [C, I]``,
  ``experts.{e}.down_weight [I, C]``, optional ``experts.{e}.gate_bias/up_bias/down_bias``;
- optional shared expert ``shared.gate_weight/up_weight/down_weight`` (+ biases) and
  ``shared_gate.weight [C, 1]``.

Spec keys (defaults in ``DEFAULTS``): ``num_experts``, ``top_k``, ``scores`` (softmax |
sigmoid), ``normalize``, ``scaling``, ``groups``, ``topk_groups``, ``group_score`` (top2_sum |
max), ``activation`` (silu | gelu | gelu_tanh | relu | relu2), ``swiglu_limit``,
``swiglu_alpha``. The shared expert exists when its weights do (``shared_size`` is not needed).

``router_margins`` gives, per token, the smallest gap that decides the routing (k-th vs
(k+1)-th selection score, and with groups the topk_groups-th vs next group score), so tests
can assert that no near-tie makes the routing depend on rounding.
"""

import math
from collections.abc import Mapping

import numpy as np

DEFAULTS = {
    "scores": "softmax",
    "normalize": False,
    "scaling": 1.0,
    "groups": 1,
    "topk_groups": 1,
    "group_score": "top2_sum",
    "activation": "silu",
    "swiglu_limit": None,
    "swiglu_alpha": 1.702,
}


def _spec(spec: Mapping | None, fields: dict) -> dict:
    merged = {**DEFAULTS, **dict(spec or {}), **fields}
    for key in ("num_experts", "top_k"):
        if key not in merged:
            raise KeyError(f"numpy_moe spec needs {key!r}")
    return merged


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _act(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "silu":
        return x * _sigmoid(x)
    if kind == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "relu2":
        return np.maximum(x, 0.0) ** 2
    raise ValueError(f"numpy_moe: unknown activation {kind!r}")


def _expert(x_C: np.ndarray, w: Mapping, name: str, spec: dict) -> np.ndarray:
    """One gated expert on one token: ``down(act(gate(x)) * up(x))`` or GPT-OSS's clamp."""

    def lin(v, role):
        y = v @ _f64(w[f"{name}.{role}_weight"])
        if f"{name}.{role}_bias" in w:
            y = y + _f64(w[f"{name}.{role}_bias"])
        return y

    gate, up = lin(x_C, "gate"), lin(x_C, "up")
    limit = spec["swiglu_limit"]
    if limit is not None:
        gate = np.minimum(gate, limit)
        up = np.clip(up, -limit, limit)
        glu = gate * _sigmoid(spec["swiglu_alpha"] * gate)
        hidden = (up + 1.0) * glu
    else:
        hidden = _act(spec["activation"], gate) * up
    return lin(hidden, "down")


def _route_token(x_C: np.ndarray, w: Mapping, spec: dict):
    """(chosen experts [k], their weights [k], margin) for one token."""
    num, k = spec["num_experts"], spec["top_k"]
    logits = x_C @ _f64(w["router.weight"])
    if "router.bias" in w:
        logits = logits + _f64(w["router.bias"])
    if spec["scores"] == "softmax":
        e = np.exp(logits - logits.max())
        scores = e / e.sum()
    elif spec["scores"] == "sigmoid":
        scores = _sigmoid(logits)
    else:
        raise ValueError(f"numpy_moe: unknown scores {spec['scores']!r}")
    choice = scores + _f64(w["router.score_bias"]) if "router.score_bias" in w else scores.copy()
    margin = np.inf
    groups, keep = spec["groups"], spec["topk_groups"]
    if groups > 1:
        size = num // groups
        group_scores = []
        for grp in range(groups):
            members = sorted(choice[grp * size : (grp + 1) * size], reverse=True)
            if spec["group_score"] == "top2_sum":
                group_scores.append(members[0] + members[1])
            elif spec["group_score"] == "max":
                group_scores.append(members[0])
            else:
                raise ValueError(f"numpy_moe: unknown group_score {spec['group_score']!r}")
        order = sorted(range(groups), key=lambda grp: -group_scores[grp])
        if keep < groups:
            margin = group_scores[order[keep - 1]] - group_scores[order[keep]]
        kept = set(order[:keep])
        allowed = [e for e in range(num) if e // size in kept]
    else:
        allowed = list(range(num))
    ranked = sorted(allowed, key=lambda e: -choice[e])
    chosen = ranked[:k]
    if len(ranked) > k:
        margin = min(margin, choice[ranked[k - 1]] - choice[ranked[k]])
    weights = np.array([scores[e] for e in chosen])
    if spec["normalize"]:
        weights = weights / weights.sum()
    return chosen, weights * spec["scaling"], margin


def moe_reference(
    x_NC: np.ndarray, weights: Mapping, spec: Mapping | None = None, **fields
) -> np.ndarray:
    """The MoE block's output ``y [N, C]`` (float64) for tokens ``x [N, C]``: routed experts'
    weighted sum plus the (optionally sigmoid-gated) shared expert."""
    s = _spec(spec, fields)
    x = _f64(x_NC)
    out = np.zeros_like(x)
    shared = "shared.gate_weight" in weights
    for n in range(len(x)):
        chosen, gains, _ = _route_token(x[n], weights, s)
        for e, gain in zip(chosen, gains):
            out[n] += gain * _expert(x[n], weights, f"experts.{e}", s)
        if shared:
            y = _expert(x[n], weights, "shared", {**s, "swiglu_limit": None})
            if "shared_gate.weight" in weights:
                y = y * _sigmoid(x[n] @ _f64(weights["shared_gate.weight"]))[0]
            out[n] += y
    return out


def router_choice(x_NC: np.ndarray, weights: Mapping, spec: Mapping | None = None, **fields):
    """(chosen experts [N, k] in selection order, routing weights [N, k]) of tokens x [N, C]."""
    s = _spec(spec, fields)
    x = _f64(x_NC)
    routes = [_route_token(x[n], weights, s) for n in range(len(x))]
    return np.array([r[0] for r in routes]), np.array([r[1] for r in routes])


def router_margins(
    x_NC: np.ndarray, weights: Mapping, spec: Mapping | None = None, **fields
) -> np.ndarray:
    """Per token ``[N]``: the smallest gap deciding its routing: k-th minus (k+1)-th selection
    score among the allowed experts, and with groups also the topk_groups-th minus the next
    group score (inf where nothing is left out)."""
    s = _spec(spec, fields)
    x = _f64(x_NC)
    return np.array([_route_token(x[n], weights, s)[2] for n in range(len(x))])


def gpt_oss_moe(w: Mapping, prefix: str, x_NC: np.ndarray, config: Mapping) -> np.ndarray:
    """GPT-OSS's MoE ``[N, C]`` from HF-named tensors under ``prefix`` (``router.weight [E, C]``
    / ``router.bias``, fused ``experts.gate_up_proj [E, C, 2I]`` whose even columns are the
    gate and odd the up, ``experts.down_proj [E, I, C]`` and their ``_bias``), through
    ``moe_reference``: softmax top-k renormalized (= softmax over the chosen logits), clamped
    SwiGLU with ``swiglu_limit`` / ``swiglu_alpha``."""
    gate_up = _f64(w[prefix + "experts.gate_up_proj"])
    gate_up_bias = _f64(w[prefix + "experts.gate_up_proj_bias"])
    down, down_bias = (
        _f64(w[prefix + "experts.down_proj"]),
        _f64(w[prefix + "experts.down_proj_bias"]),
    )
    roles = {"router.weight": _f64(w[prefix + "router.weight"]).T}
    roles["router.bias"] = _f64(w[prefix + "router.bias"])
    for e in range(gate_up.shape[0]):
        roles[f"experts.{e}.gate_weight"] = gate_up[e][:, 0::2]
        roles[f"experts.{e}.up_weight"] = gate_up[e][:, 1::2]
        roles[f"experts.{e}.gate_bias"] = gate_up_bias[e][0::2]
        roles[f"experts.{e}.up_bias"] = gate_up_bias[e][1::2]
        roles[f"experts.{e}.down_weight"] = down[e]
        roles[f"experts.{e}.down_bias"] = down_bias[e]
    spec = {
        "num_experts": gate_up.shape[0],
        "top_k": config["num_experts_per_tok"],
        "normalize": True,
        "swiglu_limit": config.get("swiglu_limit", 7.0),
        "swiglu_alpha": config.get("swiglu_alpha", 1.702),
    }
    return moe_reference(x_NC, roles, spec)
