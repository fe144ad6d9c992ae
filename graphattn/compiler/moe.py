"""How a mixture-of-experts block (:mod:`graphattn.ops.moe`) lowers.

``portable``: the block is inlined (its routed or dense body in standard ops); its expert
projections are 2-D MatMuls, quantized by the int4/int8 pass like any other.

``ort``: onnxruntime's ``com.microsoft.MoE`` (float32/float16) or ``QMoE`` (int4/int8) where
the CPU kernel computes the same thing, reading the router logits (it softmaxes them, takes the
top k and renormalizes when ``normalize_routing_weights``). The experts become its fused SwiGLU
form (``swiglu_fusion = 1``): ``fc1 [E, 2I, C]`` with gate and up rows interleaved, ``fc2
[E, C, I]``, per-expert biases ``[E, 2I]`` / ``[E, C]``, rebuilt in NumPy from the block's
weights at compile time. The parts the kernel does not have stay standard ops around it: a
router bias is added to the logits before it, ``scaling`` multiplies its output, the shared
expert (and its sigmoid gate) is computed beside it. GPT-OSS's clamped SwiGLU is the kernel's
``swiglu_limit`` / ``activation_alpha`` / ``activation_beta = 1``.

By measurement (see ``FLOAT_KERNEL_DECLINED``) int4/int8 blocks take QMoE and float blocks keep
the routed portable experts unless ``float_kernel`` (``CompileOptions(moe_kernel="always")``).
The kernel is declined (the block stays portable), with the reason recorded per layer in
``graphattn.moe_lowering`` (JSON metadata), for: sigmoid scores, group-limited selection, a
score bias (selection ≠ weighting), an activation other than SiLU / clamped SwiGLU, and for
QMoE: onnxruntime before 1.32 (its CPU kernel rejects block-wise scales), ``normalize`` off
(the CPU QMoE renormalizes anyway), a width that is not a whole number of quantization
blocks, a dequantize-at-load export.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from graphattn.compiler.blockquant import pack_matmul_nbits, quantize_columns
from graphattn.compiler.blocks import NodeEmitter
from graphattn.compiler.ort_version import parse_version
from graphattn.compiler.rewrite import MS_DOMAIN, add_initializer, take_over
from graphattn.ops.moe import SHARED_GATE, MoeAttributes, is_moe_block

MOE_LOWERING_KEY = "graphattn.moe_lowering"
# The MoE/QMoE CPU kernels with swiglu_fusion, swiglu_limit and activation_alpha/beta (checked
# in onnxruntime 1.30 and 1.32: tests/test_moe.py runs the lowered graph in the installed one).
MOE_SINCE = "1.30"
# Block-wise QMoE on CPU: 1.30 has no accuracy_level attribute (the model fails to load) and
# its kernel checks block-wise scales/zero points against the wrong widths (fc2 scales
# expected [E, C, hidden/block], zero points [E, N·bits/8]); 1.32 runs them. 1.31 not checked.
QMOE_SINCE = "1.32"
# Measured (benchmarks/moe.py, 8 experts top-2, hidden 1024, expert 2816, 8 layers, 2 cores):
# the float MoE kernel lost to the routed portable experts in the same ort graph (prefill
# 175 vs 538 tok/s, decode 21.9 vs 25.2 in the least loaded round), while QMoE beat the
# MatMulNBits experts (prefill 391 vs 196, decode 41.1 vs 26.8): int4/int8 take QMoE, float
# keeps the portable experts unless asked (``float_kernel``, CompileOptions.moe_kernel).
FLOAT_KERNEL_DECLINED = (
    "measured slower than the routed portable experts at fp32 (benchmarks/moe.py: prefill"
    " 0.33x, decode 0.87x); moe_kernel='always' takes it"
)


def why_not_kernel(
    attrs: MoeAttributes,
    *,
    bits: int | None,
    ort_version: str,
    hidden: int | None,
    width: int | None,
    block_size: int,
    dequantize_at_load: bool = False,
    float_kernel: bool = False,
) -> str | None:
    """Why ``com.microsoft.MoE``/``QMoE`` cannot compute this block (or, for the float
    kernel without ``float_kernel``, was measured slower), or None."""
    if attrs.scores != "softmax":
        return f"{attrs.scores} scores: the kernel softmaxes the router logits"
    if attrs.groups > 1:
        return "group-limited top-k (n_group/topk_group): the kernel picks over all experts"
    if "router.score_bias" in attrs.input_roles:
        return "score bias: selection and weighting differ, the kernel has one router input"
    if not attrs.swiglu_limit and attrs.activation != "silu":
        return f"activation {attrs.activation}: the kernel's gated experts are SwiGLU only"
    if bits is None and not float_kernel:
        return FLOAT_KERNEL_DECLINED
    if parse_version(ort_version) < parse_version(MOE_SINCE):
        return f"onnxruntime {ort_version} predates the fused SwiGLU MoE kernel ({MOE_SINCE})"
    if bits is not None:
        if parse_version(ort_version) < parse_version(QMOE_SINCE):
            return (
                f"onnxruntime {ort_version}'s CPU QMoE rejects block-wise scales"
                f" (block-wise QMoE needs {QMOE_SINCE})"
            )
        if not attrs.normalize:
            return (
                "QMoE's CPU kernel renormalizes the top-k weights even with"
                " normalize_routing_weights=0 (measured in onnxruntime 1.32)"
            )
        if dequantize_at_load:
            return "dequantize_at_load: float32 compute from folded blocks, no QMoE"
        for name, size in (("hidden_size", hidden), ("expert width", width)):
            if size is None or size % block_size:
                return f"QMoE needs the {name} ({size}) to be a multiple of block_size {block_size}"
    return None


class _Emit(NodeEmitter):
    """Nodes before a MoE block's node, in its scope, plus the kernel's new initializers."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node) -> None:
        super().__init__(graph, anchor, anchor.name or "mlp")

    def initializer(self, name: str, array: np.ndarray, dtype=None) -> ir.Value:
        """A new initializer (float arrays in ``dtype``, the experts' float type, if given)."""
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        if dtype is not None:
            array = array.astype(dtype)
        return add_initializer(self.graph, ir.tensor(array, name=name))


def _array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy().astype(np.float32)


def _expert_arrays(attrs: MoeAttributes, inputs: dict[str, ir.Value]):
    """Per expert (gate [C, I], up [C, I], down [I, C], biases or None), or None when a
    weight is not a constant."""
    experts = []
    for e in range(attrs.num_experts):
        parts = {}
        for part in ("gate", "up", "down"):
            weight = _array(inputs.get(f"experts.{e}.{part}_weight"))
            if weight is None:
                return None
            parts[part] = weight
            parts[f"{part}_bias"] = _array(inputs.get(f"experts.{e}.{part}_bias"))
        experts.append(parts)
    return experts


def _fc1_KN(expert: dict) -> np.ndarray:
    """``[C, 2I]`` with gate and up columns interleaved (gate0, up0, gate1, ...)."""
    gate, up = expert["gate"], expert["up"]
    fused = np.empty((gate.shape[0], 2 * gate.shape[1]), np.float32)
    fused[:, 0::2], fused[:, 1::2] = gate, up
    return fused


def _fc1_bias(expert: dict) -> np.ndarray:
    i = expert["gate"].shape[1]
    gate = expert["gate_bias"] if expert["gate_bias"] is not None else np.zeros(i, np.float32)
    up = expert["up_bias"] if expert["up_bias"] is not None else np.zeros(i, np.float32)
    fused = np.empty(2 * i, np.float32)
    fused[0::2], fused[1::2] = gate, up
    return fused


def _kernel_attributes(attrs: MoeAttributes) -> dict:
    out = {
        "k": attrs.top_k,
        "activation_type": "swiglu",
        "swiglu_fusion": 1,
        "normalize_routing_weights": attrs.normalize,
    }
    if attrs.swiglu_limit:
        out.update(
            activation_alpha=attrs.swiglu_alpha,
            activation_beta=1.0,
            swiglu_limit=attrs.swiglu_limit,
        )
    else:
        out.update(activation_alpha=1.0, activation_beta=0.0)
    return out


def _shared(e: _Emit, inputs: dict[str, ir.Value], x: ir.Value) -> ir.Value:
    def linear(v, part):
        y = e.op("MatMul", [v, inputs[f"shared.{part}_weight"]], label=f"shared/{part}")
        if f"shared.{part}_bias" in inputs:
            y = e.op("Add", [y, inputs[f"shared.{part}_bias"]], label=f"shared/{part}/bias")
        return y

    gate, up = linear(x, "gate"), linear(x, "up")
    act = e.op(
        "Mul", [gate, e.op("Sigmoid", [gate], label="shared/act/sigmoid")], label="shared/act"
    )
    y = linear(e.op("Mul", [act, up], label="shared/gated"), "down")
    if SHARED_GATE in inputs:
        g = e.op("MatMul", [x, inputs[SHARED_GATE]], label="shared_gate")
        y = e.op(
            "Mul",
            [y, e.op("Sigmoid", [g], label="shared_gate/sigmoid")],
            label="shared/sigmoid_gated",
        )
    return y


def _lower(
    graph: ir.Graph,
    node: ir.Node,
    attrs: MoeAttributes,
    experts: list[dict],
    bits: int | None,
    block_size: int,
    symmetric: bool,
    accuracy_level: int,
) -> str:
    inputs = dict(zip(attrs.input_roles, node.inputs))
    e = _Emit(graph, node)
    base = f"{e.scope.replace('/', '.')}.moe"
    gate0 = inputs["experts.0.gate_weight"].const_value
    ft = gate0.numpy().dtype  # the experts' float type (float32 or float16)
    x = inputs["x"]
    width = e.op("Shape", [x], {"start": -1}, label="moe/x_width")
    minus_one = e.initializer("moe.minus_one", np.array([-1], np.int64))
    flat = e.op("Concat", [minus_one, width], {"axis": 0}, label="moe/flat_shape")
    x_NC = e.op("Reshape", [x, flat], label="moe/x_NC")
    router = [x_NC, inputs["router.weight"]]
    if "router.bias" in inputs:
        router.append(inputs["router.bias"])
    logits = e.op("Gemm", router, label="moe/router")  # float: not packed nor quantized
    has_bias = attrs.biases("experts")
    fc1_bias = fc2_bias = None
    if has_bias:
        fc1_bias = e.initializer(
            f"{base}.fc1_bias", np.stack([_fc1_bias(x_) for x_ in experts]), ft
        )
        c = experts[0]["down"].shape[1]
        fc2_bias = e.initializer(
            f"{base}.fc2_bias",
            np.stack(
                [
                    x_["down_bias"] if x_["down_bias"] is not None else np.zeros(c, np.float32)
                    for x_ in experts
                ]
            ),
            ft,
        )
    kernel_attrs = _kernel_attributes(attrs)
    if bits is None:
        fc1 = np.stack([_fc1_KN(x_).T for x_ in experts])  # [E, 2I, C]
        fc2 = np.stack([x_["down"].T for x_ in experts])  # [E, C, I]
        moe_inputs = [
            x_NC,
            logits,
            e.initializer(f"{base}.fc1", np.ascontiguousarray(fc1), ft),
            fc1_bias,
            e.initializer(f"{base}.fc2", np.ascontiguousarray(fc2), ft),
            fc2_bias,
        ]
        routed = e.op("MoE", moe_inputs, kernel_attrs, label="moe", domain=MS_DOMAIN)
        kernel = "MoE"
    else:
        packed = {}
        for fc, matrices in (
            ("fc1", [_fc1_KN(x_) for x_ in experts]),
            ("fc2", [x_["down"] for x_ in experts]),
        ):
            parts = [
                pack_matmul_nbits(quantize_columns(m, bits, block_size, symmetric))
                for m in matrices
            ]
            b = np.stack([p[0].reshape(p[0].shape[0], -1) for p in parts])
            scales = np.stack([p[1] for p in parts])
            zero = None if any(p[2] is None for p in parts) else np.stack([p[2] for p in parts])
            if zero is not None and zero.dtype != np.uint8:
                raise ValueError(f"{base}: float zero points have no QMoE form")
            packed[fc] = (
                e.initializer(f"{base}.{fc}.q{bits}", b),
                e.initializer(f"{base}.{fc}.scales", scales),
                None if zero is None else e.initializer(f"{base}.{fc}.zero_points", zero),
            )
        (w1, s1, z1), (w2, s2, z2) = packed["fc1"], packed["fc2"]
        moe_inputs = [x_NC, logits, w1, s1, fc1_bias, w2, s2, fc2_bias, None, None, None, z1, z2]
        while moe_inputs[-1] is None:
            moe_inputs.pop()
        kernel_attrs.update(
            expert_weight_bits=bits, block_size=block_size, accuracy_level=accuracy_level
        )
        routed = e.op("QMoE", moe_inputs, kernel_attrs, label="qmoe", domain=MS_DOMAIN)
        kernel = "QMoE"
    if attrs.scaling != 1.0:
        scale = e.initializer(f"{base}.scaling", np.array(attrs.scaling), ft)
        routed = e.op("Mul", [routed, scale], label="moe/scaled")
    if attrs.shared:
        routed = e.op("Add", [routed, _shared(e, inputs, x_NC)], label="moe/with_shared")
    shape = e.op("Shape", [x], label="moe/x_shape")
    out = e.op("Reshape", [routed, shape], label="moe/output")
    take_over(node.outputs[0], out)
    graph.remove(node, safe=True)
    graph.opset_imports[MS_DOMAIN] = 1
    return kernel


def lower_moe_blocks(
    model: ir.Model,
    *,
    target: str,
    bits: int | None = None,
    block_size: int = 32,
    symmetric: bool = False,
    accuracy_level: int = 4,
    ort_version: str = MOE_SINCE,
    dequantize_at_load: bool = False,
    prequantized=(),
    float_kernel: bool = False,
) -> list[dict]:
    """Lower every MoE block call (``ort``: QMoE, and with ``float_kernel`` MoE, where
    :func:`why_not_kernel` allows);
    the others stay calls (inlined later as portable ops). Records and returns the decisions
    ``{"layer", "kernel", "form", "reasons"}``."""
    graph, decisions = model.graph, []
    for node in list(graph):
        if not is_moe_block(node):
            continue
        attrs = MoeAttributes.of(node)
        inputs = dict(zip(attrs.input_roles, node.inputs))
        layer = (node.name or "mlp").split("/")[0]
        decision = {"layer": layer, "kernel": "portable", "form": attrs.form, "reasons": {}}
        kernel = "QMoE" if bits is not None else "MoE"
        if target != "ort":
            decision["reasons"][kernel] = f"target {target}: standard ops only"
            decisions.append(decision)
            continue
        experts = _expert_arrays(attrs, inputs)
        hidden = width = None
        if experts is not None:
            hidden, width = experts[0]["gate"].shape
        reason = why_not_kernel(
            attrs,
            bits=bits,
            ort_version=ort_version,
            hidden=hidden,
            width=width,
            block_size=block_size,
            dequantize_at_load=dequantize_at_load,
            float_kernel=float_kernel,
        )
        if reason is None and experts is None:
            reason = "expert weights are not constants"
        if (
            reason is None
            and prequantized
            and any(v.name in prequantized for r, v in inputs.items() if r.startswith("experts."))
        ):
            reason = "prequantized expert blocks: kept as MatMulNBits"
        if reason is not None:
            decision["reasons"][kernel] = reason
        else:
            decision["kernel"] = _lower(
                graph,
                node,
                attrs,
                experts,
                bits,
                block_size,
                symmetric,
                accuracy_level,
            )
            decision.pop("form")
        decisions.append(decision)
    if decisions:
        model.metadata_props[MOE_LOWERING_KEY] = json.dumps(decisions, separators=(",", ":"))
    for value in list(graph.initializers.values()):
        if not value.uses() and value not in graph.outputs:
            del graph.initializers[value.name]
    return decisions


def explain_moe(metadata: dict[str, str]) -> list[str]:
    """Lines for ``inspect --explain``: per layer, what each MoE block became and why not the
    contrib kernel."""
    raw = metadata.get(MOE_LOWERING_KEY)
    if raw is None:
        return []
    lines = ["mixture-of-experts lowering (per layer):"]
    for d in json.loads(raw):
        kernel = d["kernel"] + (f" ({d['form']} experts)" if d.get("form") else "")
        lines.append(f"  {d['layer']}: {kernel}")
        for other, reason in d["reasons"].items():
            lines.append(f"    not {other}: {reason}")
    return lines
