"""The mixture-of-experts block (graphattn.ops.moe) against the float64 NumPy reference
(tests/numpy_moe.py, written from MoeSpec's definitions), in onnxruntime and the interpreter;
its ort lowering (com.microsoft MoE / QMoE) against the portable form; every precision.

Routing is made deterministic by construction: each case's seed is checked first for router
margins (k-th vs (k+1)-th selection score, and group scores) above ``MARGIN`` on every token,
so a rounding difference cannot change which experts a token gets.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import assert_close
from numpy_moe import moe_reference, router_choice, router_margins

from graphattn.builder import build_decoder
from graphattn.compiler import CompileOptions, compile_model
from graphattn.compiler.blockquant import quantize_columns
from graphattn.compiler.moe import MOE_LOWERING_KEY, explain_moe, lower_moe_blocks
from graphattn.compiler.portable import lower_portable
from graphattn.compiler.quantize import quantize_weights
from graphattn.interpreter import Interpreter
from graphattn.ops import GraphEmitter
from graphattn.ops.moe import moe_block
from graphattn.spec import (
    AttentionSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    MoeSpec,
    NormSpec,
    RopeSpec,
)

C, E, F = 32, 8, 32  # hidden, experts, expert width: multiples of the 32-wide quantization blocks
MARGIN = 1e-3  # fp32 scores err ~1e-7: far below
MARGIN_FP16 = 2e-2  # fp16 scores err ~1e-3 (11-bit mantissa over a 32-term router dot product)
FP32_ATOL = 2e-5  # outputs are O(1-10); fp32 accumulation over C=32 and F=32 terms

# (name, spec, weight flags): every routing and expert feature, alone or combined
CASES = [
    ("softmax_topk", dict(num_experts=E, top_k=2), {}),
    ("softmax_norm_scaled", dict(num_experts=E, top_k=2, normalize=True, scaling=1.7), {}),
    (
        "sigmoid_groups_score_bias_shared",
        dict(
            num_experts=E,
            top_k=3,
            scores="sigmoid",
            normalize=True,
            scaling=2.5,
            groups=4,
            topk_groups=2,
        ),
        dict(score_bias=True, shared=True),
    ),
    (
        "softmax_groups_max_gated_shared",
        dict(num_experts=E, top_k=2, groups=4, topk_groups=2, group_score="max", scaling=1.5),
        dict(shared=True, shared_gate=True),
    ),
    (
        "gpt_oss_clamped_biases_router_bias",
        dict(num_experts=E, top_k=2, normalize=True, swiglu_limit=1.2, swiglu_alpha=1.702),
        dict(biases=True, router_bias=True),
    ),
    ("gelu_biases", dict(num_experts=E, top_k=1, activation="gelu"), dict(biases=True)),
    ("relu2_shared_biased", dict(num_experts=E, top_k=2), dict(shared=True, biases=True)),
]
IDS = [c[0] for c in CASES]


def make_weights(seed: int, flags: dict) -> dict[str, np.ndarray]:
    """Roles under ``layers.{i}.mlp.`` (graph layout [in, out]), float32."""
    rng = np.random.default_rng(seed)
    w = {"router.weight": rng.normal(size=(C, E)) * 0.5}
    if flags.get("router_bias"):
        w["router.bias"] = rng.normal(size=E) * 0.3
    if flags.get("score_bias"):
        w["router.score_bias"] = rng.normal(size=E) * 0.1
    names = [f"experts.{e}" for e in range(E)] + (["shared"] if flags.get("shared") else [])
    for name in names:
        for part, shape in (("gate", (C, F)), ("up", (C, F)), ("down", (F, C))):
            w[f"{name}.{part}_weight"] = rng.normal(size=shape) * 0.3
            if flags.get("biases"):
                w[f"{name}.{part}_bias"] = rng.normal(size=shape[1]) * 0.1
    if flags.get("shared_gate"):
        w["shared_gate.weight"] = rng.normal(size=(C, 1)) * 0.3
    return {k: v.astype(np.float32) for k, v in w.items()}


def robust_case(spec: dict, flags: dict, tokens: int, margin: float = MARGIN):
    """(weights, x [tokens, C]) of the first seed whose every token routes with ``margin``."""
    for seed in range(100):
        w = make_weights(seed, flags)
        x = np.random.default_rng(1000 + seed).normal(size=(tokens, C)).astype(np.float32)
        if router_margins(x, w, spec).min() > margin:
            return w, x
    raise AssertionError(f"no seed below 100 routes {tokens} tokens with margin {margin}")


def block_model(w: dict, spec: dict, form: str, dtype=np.float32) -> ir.Model:
    """A graph ``x [N, C] → y [N, C]`` around one MoE block call."""
    ir_type = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
    g = GraphEmitter("moe_test")
    x = g.input("x", ir_type, ["N", C])
    values = {r: g.initializer(r, a.astype(dtype)) for r, a in w.items()}
    y = moe_block(g, x, values, form=form, name="layers.0/mlp", **spec)
    g.output(y, "y", ir_type, ["N", C])
    return g.model()


def run_ort(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """One CPU run; DequantizeLinear→MatMul fused by onnxruntime keeps float activations
    (its fusion defaults to accuracy level 4, int8 activations)."""
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def lowered(
    w, spec, form, *, target, bits=None, dtype=np.float32, ort_version="1.32", float_kernel=True
):
    """The block graph lowered like compile_model does (MoE rule, portable, quantization),
    accuracy_level 0 (float activations) so int4/int8 differ from float only by the weights."""
    model = block_model(w, spec, form, dtype)
    decisions = lower_moe_blocks(
        model,
        target=target,
        bits=bits,
        ort_version=ort_version,
        accuracy_level=0,
        float_kernel=float_kernel,
    )
    lower_portable(model)
    if bits is not None:
        quantize_weights(
            model,
            bits=bits,
            block_size=32,
            standard=target == "portable",
            quantize_lm_head=False,
            accuracy_level=0,
        )
    return model, decisions


@pytest.mark.parametrize("form", ["routed", "dense"])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("name,spec,flags", CASES, ids=IDS)
def test_block_matches_numpy_reference(name, spec, flags, tokens, form):
    w, x = robust_case(spec, flags, tokens)
    expected = moe_reference(x, w, spec)
    model = block_model(w, spec, form)
    assert_close(run_ort(model, x), expected, FP32_ATOL, f"{name} {form} ort")
    if spec.get("activation") == "gelu" and form == "routed":
        # onnx.reference's Gelu (np.vectorize of erf) fails on an expert's empty token set;
        # the dense form runs the same Gelu experts through the interpreter
        return
    proto = ir.serde.serialize_model(model)
    got = Interpreter(proto).run({"x": x})["y"]
    assert_close(got, expected, FP32_ATOL, f"{name} {form} interpreter")


def test_reference_routes_as_defined():
    """numpy_moe itself: a hand-made router whose choice is known (sigmoid + score bias picks
    by choice but weighs by score; groups drop the best single expert of a weak group)."""
    w = make_weights(0, {"score_bias": True})
    w["router.weight"] = np.zeros((C, E), np.float32)
    w["router.weight"][0] = [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 2.5, 2.4]
    w["router.score_bias"] = np.array([0, 0, 0, 0, 0, 0, -0.5, 0], np.float32)
    x = np.zeros((1, C), np.float32)
    x[0, 0] = 1.0
    spec = dict(num_experts=E, top_k=2, scores="sigmoid")
    sig = 1 / (1 + np.exp(-np.array([3.0, 2.4])))
    # expert 6 scores σ(2.5) but chooses by σ(2.5) − 0.5 < σ(2.0): experts 0 and 7 win
    chosen, gains = router_choice(x, w, spec)
    assert sorted(chosen[0]) == [0, 7]
    np.testing.assert_allclose(sorted(gains[0]), sorted(sig), rtol=1e-6)  # float32 logits
    grouped = dict(spec, groups=4, topk_groups=1, group_score="max")  # group 0 = {0, 1} wins
    chosen, _ = router_choice(x, w, grouped)
    assert sorted(chosen[0]) == [0, 1]


ORT_CASES = [c for c in CASES if c[0] in ("softmax_topk", "softmax_norm_scaled")] + [
    c for c in CASES if c[0] == "gpt_oss_clamped_biases_router_bias"
]


@pytest.mark.parametrize("name,spec,flags", ORT_CASES, ids=[c[0] for c in ORT_CASES])
def test_ort_moe_kernel_equals_portable(name, spec, flags):
    """fp32: com.microsoft MoE (router bias before, scaling after) = the portable block."""
    w, x = robust_case(spec, flags, 9)
    kernel, decisions = lowered(w, spec, "routed", target="ort")
    portable, _ = lowered(w, spec, "routed", target="portable")
    assert decisions[0]["kernel"] == "MoE", decisions
    assert any(n.op_type == "MoE" for n in kernel.graph)
    assert_close(run_ort(kernel, x), run_ort(portable, x).astype(np.float64), 1e-5, name)


def test_ort_moe_with_shared_expert_equals_portable():
    spec = dict(num_experts=E, top_k=2, normalize=True)
    w, x = robust_case(spec, dict(shared=True, shared_gate=True), 5)
    kernel, decisions = lowered(w, spec, "routed", target="ort")
    assert decisions[0]["kernel"] == "MoE"
    expected = moe_reference(x, w, spec)
    assert_close(run_ort(kernel, x), expected, FP32_ATOL, "MoE + gated shared expert")


@pytest.mark.parametrize(
    "name,reason",
    [
        ("sigmoid_groups_score_bias_shared", "sigmoid scores"),
        ("softmax_groups_max_gated_shared", "group-limited top-k"),
        ("gelu_biases", "activation gelu"),
    ],
)
def test_ort_declines_with_reason(name, reason):
    _, spec, flags = next(c for c in CASES if c[0] == name)
    w, x = robust_case(spec, flags, 3)
    model, decisions = lowered(w, spec, "routed", target="ort")
    assert decisions[0]["kernel"] == "portable"
    assert reason in decisions[0]["reasons"]["MoE"]
    assert not any(n.domain == "com.microsoft" for n in model.graph)
    assert_close(run_ort(model, x), moe_reference(x, w, spec), FP32_ATOL, name)
    lines = explain_moe({MOE_LOWERING_KEY: model.metadata_props[MOE_LOWERING_KEY]})
    assert any(reason in line for line in lines)


def test_qmoe_declined_before_132_and_without_normalize():
    spec = dict(num_experts=E, top_k=2, normalize=True)
    w, _ = robust_case(spec, {}, 3)
    _, old = lowered(w, spec, "routed", target="ort", bits=4, ort_version="1.30")
    assert old[0]["kernel"] == "portable" and "1.32" in old[0]["reasons"]["QMoE"]
    _, plain = lowered(w, dict(spec, normalize=False), "routed", target="ort", bits=4)
    assert "renormalizes" in plain[0]["reasons"]["QMoE"]
    _, fp32_old = lowered(w, spec, "routed", target="ort", ort_version="1.30")
    assert fp32_old[0]["kernel"] == "MoE"  # the float kernel runs in 1.30 too


def dequantized(w: dict, bits: int) -> dict:
    """The weights as the int4/int8 graphs hold them: every 2-D expert/shared projection
    through round-to-nearest 32-blocks; the router stays float (a Gemm)."""
    out = {}
    for role, array in w.items():
        if role.startswith(("experts.", "shared.")) and array.ndim == 2:
            out[role] = quantize_columns(array, bits, 32).dequantize()
        else:
            out[role] = array
    return out


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "target,form", [("portable", "routed"), ("portable", "dense"), ("ort", "routed")]
)
def test_integer_precisions(bits, target, form):
    """int4/int8 (MatMulNBits / blocked DequantizeLinear / QMoE at ort 1.32) equal the
    reference on the quantized weights (float activations, so only fp32 rounding remains),
    and stay near the float model by the size of the weight rounding."""
    spec = dict(num_experts=E, top_k=2, normalize=True)
    w, x = robust_case(spec, dict(shared=True), 6)
    model, decisions = lowered(w, spec, form, target=target, bits=bits)
    if target == "ort":
        assert decisions[0]["kernel"] == "QMoE"
    router_gemms = [n for n in model.graph if n.op_type == "Gemm"]
    assert router_gemms, "the router stays a float Gemm"
    got = run_ort(model, x)
    assert np.isfinite(got).all()
    expected = moe_reference(x, dequantized(w, bits), spec)
    atol = 1e-4
    if target == "ort" and bits == 8:
        # QMoE's 8-bit CPU kernel always quantizes activations to int8 (no float kernel, as
        # its schema says): 1/254 of each 32-block's range per input, through two GEMMs
        atol = 3e-2 * np.abs(expected).max()
    assert_close(got, expected, atol, f"int{bits} {target}")
    drift = np.abs(got - moe_reference(x, w, spec)).max() / np.abs(got).max()
    assert drift < (0.25 if bits == 4 else 0.02), f"int{bits} drifts {drift:.3g} from fp32"


FP16_CASES = {
    "softmax_gated_shared": (
        dict(num_experts=E, top_k=2, normalize=True),
        dict(shared=True, shared_gate=True),
    ),
    "sigmoid_groups_score_bias": (CASES[2][1], CASES[2][2]),
}


@pytest.mark.parametrize("case", list(FP16_CASES))
@pytest.mark.parametrize(
    "target,form", [("portable", "routed"), ("portable", "dense"), ("ort", "routed")]
)
def test_float16(case, target, form):
    """fp16 weights and activations: finite and within fp16 rounding of the fp32 reference
    (relative 1e-2 of the output scale: 11-bit mantissas through three matmuls)."""
    spec, flags = FP16_CASES[case]
    w, x = robust_case(spec, flags, 6, MARGIN_FP16)
    model, decisions = lowered(w, spec, form, target=target, dtype=np.float16)
    kernel = "MoE" if target == "ort" and case.startswith("softmax") else "portable"
    assert decisions[0]["kernel"] == kernel
    got = run_ort(model, x.astype(np.float16)).astype(np.float64)
    expected = moe_reference(x, w, spec)
    assert np.isfinite(got).all()
    assert_close(got, expected, 1e-2 * np.abs(expected).max(), f"fp16 {case} {target} {form}")


def test_block_refuses_bad_weights():
    spec = dict(num_experts=E, top_k=2)
    w = make_weights(0, {})
    del w["experts.3.up_weight"]
    with pytest.raises(ValueError, match="experts.3.up_weight"):
        block_model(w, spec, "routed")
    w = make_weights(0, {})
    w["experts.9.gate_weight"] = w["experts.0.gate_weight"]
    with pytest.raises(ValueError, match="unknown weight roles"):
        block_model(w, spec, "routed")
    with pytest.raises(ValueError, match="top_k"):
        block_model(make_weights(0, {}), dict(spec, top_k=9), "routed")


def tiny_moe_decoder(layers: int = 2):
    norm = NormSpec("rms", 1e-5)
    moe = MoeSpec(num_experts=E, top_k=2, expert_size=F, normalize=True)
    layer = LayerSpec(
        AttentionSpec(4, 2, 8, rope=RopeSpec(rotary_dim=8, theta=1e4, context=64)),
        MlpSpec("moe", "silu", F, moe=moe),
        {"attn_norm": norm, "mlp_norm": norm},
    )
    cfg = ModelConfig("moe_test", 50, C, 64, (layer,) * layers, norm)
    rng = np.random.default_rng(3)
    w = {"embed_tokens": rng.normal(size=(50, C)), "lm_head.weight": rng.normal(size=(50, C))}
    w["final_norm.weight"] = np.ones(C)
    for i in range(layers):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = w[p + "mlp_norm.weight"] = np.ones(C)
        for part, cols in (("q", 32), ("k", 16), ("v", 16)):
            w[f"{p}{part}.weight"] = rng.normal(size=(C, cols)) * 0.2
        w[p + "o.weight"] = rng.normal(size=(32, C)) * 0.2
        for role, array in make_weights(i, {}).items():
            w[f"{p}mlp.{role}"] = array
    return cfg, {k: ir.tensor(np.asarray(v, np.float32), name=k) for k, v in w.items()}


def test_decoder_targets_agree():
    """layers.mlp dispatches kind moe to the block; functions, portable, ort (fp32: portable
    experts, the measured default) and ort with moe_kernel='always' (com.microsoft MoE) give
    the same logits, and the ort graphs record their MoE lowering per layer."""
    cfg, tensors = tiny_moe_decoder()
    ids = np.array([[3, 17, 5, 42, 8]], np.int64)
    results = {}
    for target in ("functions", "portable", "ort", "ort-kernel"):
        model = build_decoder(cfg, tensors)
        if target != "functions":
            kernel = "always" if target == "ort-kernel" else "measured"
            compile_model(model, CompileOptions(target=target.split("-")[0], moe_kernel=kernel))
        proto = ir.serde.serialize_model(model)
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1])[None],
        }
        names = {i.name for i in session.get_inputs()}
        for inp in session.get_inputs():
            if inp.name.startswith("past_key_values."):
                feeds[inp.name] = np.zeros((1, 2, 0, 8), np.float32)
        results[target] = session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
        if target.startswith("ort"):
            decisions = json.loads(model.metadata_props[MOE_LOWERING_KEY])
            kernel = "MoE" if target == "ort-kernel" else "portable"
            assert [d["kernel"] for d in decisions] == [kernel, kernel]
            assert any(n.op_type == "MoE" for n in model.graph) == (kernel == "MoE")
            if kernel == "portable":  # fp32: the measured choice, said so per layer
                assert all("measured slower" in d["reasons"]["MoE"] for d in decisions)
    for target in ("portable", "ort", "ort-kernel"):
        assert_close(results[target], results["functions"].astype(np.float64), 1e-4, target)
