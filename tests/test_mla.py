"""Multi-head latent attention (graphattn.ops.mla) through build + compile, on hand-made
tiny configs with random weights.

The reference is an independent float64 NumPy decoder written from the MLA definitions in
the *expanded* form (per head ``k_nope = c W_kb``, ``v = c W_vb`` from the torch-layout
``kv_b_proj [H·(n + v), r]``, loops over heads and positions); the graphs get ``k_up``/``v_up``
from the same ``kv_b`` through ``spec.latent_up``. Checked: the block (both forms) against the
reference in onnxruntime and the interpreter; absorbed against expanded (≤ 1e-5); the cache
tensors' names and latent shapes; every target and precision; prefill + decode against one
pass; a left-padded batch against its rows alone; the lowering decision.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import assert_close

from graphattn.builder import build_decoder
from graphattn.compiler import CompileOptions, compile_model
from graphattn.compiler.blocks import explain
from graphattn.interpreter import Interpreter
from graphattn.ops import GraphEmitter
from graphattn.ops.mla import latent_attention_block
from graphattn.spec import (
    LOWERING_KEY,
    AttentionSpec,
    LatentSpec,
    LayerSpec,
    MlpSpec,
    ModelConfig,
    NormSpec,
    RopeSpec,
    latent_up,
)

# int4/int8 blocks are 32 wide: every quantized projection's input width is a multiple of 32
H, NOPE, ROPE, V, RANK, Q_RANK, C, VOCAB, FFN = 4, 8, 4, 8, 16, 32, 32, 40, 32
THETA, NORM_EPS, LATENT_EPS = 10000.0, 1e-5, 1e-6
SCALE = 0.37  # not 1/sqrt(head_dim): the scale attribute must reach the scores


def mla_config(q_lora: bool, interleaved: bool, form: str = "absorbed", layers: int = 2):
    latent = LatentSpec(
        kv_lora_rank=RANK,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        norm=NormSpec("rms", LATENT_EPS),
        q_lora_rank=Q_RANK if q_lora else None,
        form=form,
    )
    rope = RopeSpec(rotary_dim=ROPE, theta=THETA, interleaved=interleaved, context=64)
    attention = AttentionSpec(H, H, NOPE + ROPE, rope=rope, scale=SCALE, latent=latent)
    norm = NormSpec("rms", NORM_EPS)
    layer = LayerSpec(
        attention, MlpSpec("gated", "silu", FFN), {"attn_norm": norm, "mlp_norm": norm}
    )
    return ModelConfig(
        model_type="mla_test",
        vocab_size=VOCAB,
        hidden_size=C,
        context_length=64,
        layers=(layer,) * layers,
        final_norm=norm,
    )


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Reference weights: torch-free but in the checkpoint's terms (``kv_b`` whole)."""
    rng = np.random.default_rng(seed)

    def mat(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def near_one(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"embed_tokens": mat(VOCAB, C, scale=1.0), "final_norm.weight": near_one(C)}
    w["lm_head.weight"] = mat(VOCAB, C)
    for i, layer in enumerate(cfg.layers):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"], w[p + "mlp_norm.weight"] = near_one(C), near_one(C)
        if layer.attention.latent.q_lora_rank:
            w[p + "q_a.weight"] = mat(C, Q_RANK)
            w[p + "q_a_norm.weight"] = near_one(Q_RANK)
            w[p + "q_b.weight"] = mat(Q_RANK, H * (NOPE + ROPE))
        else:
            w[p + "q.weight"] = mat(C, H * (NOPE + ROPE))
        w[p + "kv_a.weight"] = mat(C, RANK + ROPE)
        w[p + "kv_a_norm.weight"] = near_one(RANK)
        w[p + "kv_b"] = mat(H * (NOPE + V), RANK)  # torch layout [out, in]
        w[p + "o.weight"] = mat(H * V, C)
        w[p + "mlp.gate_weight"], w[p + "mlp.up_weight"] = mat(C, FFN), mat(C, FFN)
        w[p + "mlp.down_weight"] = mat(FFN, C)
    return w


def graph_tensors(weights: dict[str, np.ndarray], dtype=np.float32) -> dict[str, ir.Tensor]:
    """Builder roles: ``kv_b`` becomes ``k_up``/``v_up`` by the spec's fix-up."""
    roles = {}
    for name, array in weights.items():
        if name.endswith(".kv_b"):
            prefix = name.removesuffix("kv_b")
            roles[prefix + "k_up.weight"] = latent_up("key", H, NOPE, V)(array)
            roles[prefix + "v_up.weight"] = latent_up("value", H, NOPE, V)(array)
        else:
            roles[name] = array
    return {r: ir.tensor(np.ascontiguousarray(a, dtype=dtype), name=r) for r, a in roles.items()}


# ------------------------------------------------------------- the NumPy reference (float64)
def rms(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rotate(x, positions, interleaved):
    """RoPE of ``x [S, ..., ROPE]`` at ``positions [S]``: pairs (2i, 2i+1) or (i, i + ROPE/2)
    turned by ``position · THETA^(-2i/ROPE)``."""
    out = np.empty_like(x)
    half = ROPE // 2
    for s, position in enumerate(positions):
        for i in range(half):
            angle = position * THETA ** (-2 * i / ROPE)
            a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
            cos, sin = np.cos(angle), np.sin(angle)
            out[s, ..., a] = x[s, ..., a] * cos - x[s, ..., b] * sin
            out[s, ..., b] = x[s, ..., b] * cos + x[s, ..., a] * sin
    return out


def reference_attention(x, w, p, cache, positions, cfg_layer):
    """One row's MLA, expanded: x [S, C], cache (latent [P, r], rope key [P, p]) → output
    [S, C], new cache."""
    a = cfg_layer.attention
    interleaved = a.rope.interleaved
    if a.latent.q_lora_rank:
        q = rms(x @ w[p + "q_a.weight"], w[p + "q_a_norm.weight"], LATENT_EPS)
        q = q @ w[p + "q_b.weight"]
    else:
        q = x @ w[p + "q.weight"]
    q = q.reshape(len(x), H, NOPE + ROPE)
    q_nope, q_rope = q[..., :NOPE], rotate(q[..., NOPE:], positions, interleaved)
    kv = x @ w[p + "kv_a.weight"]
    c = rms(kv[:, :RANK], w[p + "kv_a_norm.weight"], LATENT_EPS)
    k_rope = rotate(kv[:, RANK:], positions, interleaved)
    latent = np.concatenate([cache[0], c])
    rope_key = np.concatenate([cache[1], k_rope])
    kv_b = w[p + "kv_b"].astype(np.float64).reshape(H, NOPE + V, RANK)
    past = len(cache[0])
    out = np.zeros((len(x), H, V))
    for h in range(H):
        k_nope = latent @ kv_b[h, :NOPE].T  # [T, n]
        value = latent @ kv_b[h, NOPE:].T  # [T, v]
        key = np.concatenate([k_nope, rope_key], axis=1)
        for s in range(len(x)):
            query = np.concatenate([q_nope[s, h], q_rope[s, h]])
            visible = past + s + 1
            scores = SCALE * (key[:visible] @ query)
            probs = np.exp(scores - scores.max())
            out[s, h] = (probs / probs.sum()) @ value[:visible]
    return out.reshape(len(x), H * V) @ w[p + "o.weight"], (latent, rope_key)


def reference_decoder(cfg, w, ids, caches, start):
    """One row: ids [S] at positions start.. → logits [S, V], new caches per layer."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    positions = np.arange(start, start + len(ids))
    h = w["embed_tokens"][ids]
    new_caches = []
    for i, layer in enumerate(cfg.layers):
        p = f"layers.{i}."
        attended, cache = reference_attention(
            rms(h, w[p + "attn_norm.weight"], NORM_EPS), w, p, caches[i], positions, layer
        )
        new_caches.append(cache)
        h = h + attended
        m = rms(h, w[p + "mlp_norm.weight"], NORM_EPS)
        gate = m @ w[p + "mlp.gate_weight"]
        h = (
            h
            + (gate / (1 + np.exp(-gate)) * (m @ w[p + "mlp.up_weight"])) @ w[p + "mlp.down_weight"]
        )
    h = rms(h, w["final_norm.weight"], NORM_EPS)
    return h @ w["lm_head.weight"].T, new_caches


def empty_reference_caches(cfg):
    return [(np.zeros((0, RANK)), np.zeros((0, ROPE))) for _ in cfg.layers]


# ------------------------------------------------------------------------- running graphs
def build(cfg, weights, target="functions", precision="fp32"):
    dtype = np.float16 if precision == "fp16" else np.float32
    ir_dtype = ir.DataType.FLOAT16 if precision == "fp16" else ir.DataType.FLOAT
    model = build_decoder(cfg, graph_tensors(weights, dtype), dtype=ir_dtype)
    compile_model(model, CompileOptions(target=target, precision=precision))
    return ir.serde.serialize_model(model)


class Runner:
    """A small feed loop: prefill then decode, the cache read from the graph's I/O names."""

    def __init__(self, proto: onnx.ModelProto, interpreter: bool = False) -> None:
        self.proto = proto
        if interpreter:
            self.interpreter = Interpreter(proto)
            self.input_names = [i.name for i in proto.graph.input]
        else:
            self.session = ort.InferenceSession(
                proto.SerializeToString(), providers=["CPUExecutionProvider"]
            )
            self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in proto.graph.output]
        self.interpreted = interpreter
        elem = proto.graph.input[-1].type.tensor_type.elem_type
        self.dtype = np.float16 if elem == onnx.TensorProto.FLOAT16 else np.float32
        self.pasts = {}
        for value in proto.graph.input:
            if value.name.startswith("past_key_values."):
                dims = [
                    d.dim_value if d.HasField("dim_value") else d.dim_param
                    for d in value.type.tensor_type.shape.dim
                ]
                self.pasts[value.name] = dims

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        def concrete(d):
            return batch if d == "batch_size" else 0 if d == "past_sequence_length" else d

        return {
            n: np.zeros([concrete(d) for d in dims], self.dtype) for n, dims in self.pasts.items()
        }

    def __call__(self, ids, mask, past):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
        feeds = {"input_ids": ids, "attention_mask": mask, **past}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = positions[:, -ids.shape[1] :].astype(np.int64)
        if self.interpreted:
            out = self.interpreter.run(feeds)
            outputs = [out[n] for n in self.output_names]
        else:
            outputs = self.session.run(self.output_names, feeds)
        named = dict(zip(self.output_names, outputs))
        present = {
            n.replace("present.", "past_key_values.", 1): v
            for n, v in named.items()
            if n.startswith("present.")
        }
        return named["logits"], present, named

    def steps(self, ids, mask, chunks):
        """Logits per call: ``ids`` prefill then each chunk of ``chunks`` [B, k]."""
        past = self.empty(ids.shape[0])
        logits, past, named = self(ids, mask, past)
        calls, presents = [logits], [named]
        for chunk in chunks:
            mask = np.concatenate([mask, np.ones_like(chunk)], axis=1)
            logits, past, named = self(chunk, mask, past)
            calls.append(logits)
            presents.append(named)
        return calls, presents


RNG_IDS = np.random.default_rng(7).integers(0, VOCAB, size=(2, 8))
PREFILL, DECODE = 5, 3


def reference_calls(cfg, w, ids):
    """The reference's logits for a prefill of PREFILL then DECODE one-token calls, per row."""
    calls = [[] for _ in range(DECODE + 1)]
    caches_out = []
    for row in ids:
        caches = empty_reference_caches(cfg)
        logits, caches = reference_decoder(cfg, w, row[:PREFILL], caches, 0)
        calls[0].append(logits)
        for k in range(DECODE):
            logits, caches = reference_decoder(
                cfg, w, row[PREFILL + k : PREFILL + k + 1], caches, PREFILL + k
            )
            calls[k + 1].append(logits)
        caches_out.append(caches)
    return [np.stack(c) for c in calls], caches_out


def run_steps(runner, ids):
    mask = np.ones((ids.shape[0], PREFILL), np.int64)
    chunks = [ids[:, PREFILL + k : PREFILL + k + 1] for k in range(DECODE)]
    return runner.steps(ids[:, :PREFILL], mask, chunks)


CASES = [(True, True), (False, False), (True, False), (False, True)]  # (q_lora, interleaved)


def hybrid_from(monkeypatch, tokens: int | None) -> None:
    """Absorbed blocks expand calls of at least ``tokens`` tokens (None: never)."""
    import graphattn.layers

    monkeypatch.setattr(graphattn.layers, "expand_threshold", lambda *_: tokens or 0)


@pytest.mark.parametrize("form", ["absorbed", "hybrid", "expanded"])
@pytest.mark.parametrize(("q_lora", "interleaved"), CASES[:2])
def test_block_matches_numpy_reference(q_lora, interleaved, form, monkeypatch):
    """(a) the functions graph in onnxruntime and the interpreter against the float64
    reference, every call's logits and the final caches; (c) the cache tensors are the
    latent ``[B, T, r]`` and rope key ``[B, T, p]``. ``hybrid``: absorbed with calls of ≥ 3
    tokens expanded (the prefill takes the If's expanded branch, the decode calls the
    absorbed one)."""
    hybrid_from(monkeypatch, 3 if form == "hybrid" else None)
    cfg = mla_config(q_lora, interleaved, "expanded" if form == "expanded" else "absorbed")
    w = random_weights(cfg)
    proto = build(cfg, w)
    names = [i.name for i in proto.graph.input]
    assert names[3:] == [
        f"past_key_values.{i}.{n}" for i in range(2) for n in ("latent", "rope_key")
    ]
    outputs = [o.name for o in proto.graph.output]
    assert outputs[1:] == [f"present.{i}.{n}" for i in range(2) for n in ("latent", "rope_key")]
    expected, caches = reference_calls(cfg, w, RNG_IDS)
    for interpreter in (False, True):
        what = "interpreter" if interpreter else "onnxruntime"
        calls, presents = run_steps(Runner(proto, interpreter), RNG_IDS)
        for k, (mine, theirs) in enumerate(zip(calls, expected)):
            assert_close(mine, theirs, 1e-4, f"{what} {form} call {k} logits")
        last = presents[-1]
        total = PREFILL + DECODE
        for i in range(2):
            latent, rope_key = last[f"present.{i}.latent"], last[f"present.{i}.rope_key"]
            assert latent.shape == (2, total, RANK) and rope_key.shape == (2, total, ROPE)
            assert_close(latent, np.stack([c[i][0] for c in caches]), 1e-5, f"{what} latent {i}")
            assert_close(
                rope_key, np.stack([c[i][1] for c in caches]), 1e-5, f"{what} rope key {i}"
            )


@pytest.mark.parametrize(("q_lora", "interleaved"), CASES)
def test_absorbed_equals_expanded(q_lora, interleaved, monkeypatch):
    """(b) the absorbed decode equals the expanded form (prefill N, then K decode calls, one
    of them two tokens long), logits and caches ≤ 1e-5, on the portable target; so does the
    hybrid (prefill expanded, decode absorbed)."""
    w = random_weights(mla_config(q_lora, interleaved))
    mask = np.ones((2, PREFILL), np.int64)
    chunks = [RNG_IDS[:, 5:6], RNG_IDS[:, 6:8]]
    results = {}
    for label, form, expand_from in (
        ("absorbed", "absorbed", None),
        ("hybrid", "absorbed", 3),
        ("expanded", "expanded", None),
    ):
        hybrid_from(monkeypatch, expand_from)
        runner = Runner(build(mla_config(q_lora, interleaved, form), w, "portable"))
        results[label] = runner.steps(RNG_IDS[:, :PREFILL], mask, chunks)
    expanded, expanded_presents = results.pop("expanded")
    for label, (calls, presents) in results.items():
        for k, (a, e) in enumerate(zip(calls, expanded)):
            assert_close(a, e.astype(np.float64), 1e-5, f"{label} call {k} logits")
        for name, value in presents[-1].items():
            assert_close(value, expanded_presents[-1][name].astype(np.float64), 1e-5, name)


def test_every_target_and_precision(monkeypatch):
    """(d) functions/portable/ort at fp32 match the reference; fp16, int8 and int4 run and
    give finite logits and latent caches of the right shapes. The If expands calls of ≥ 3
    tokens, so the prefill runs the expanded branch and decode the absorbed one."""
    hybrid_from(monkeypatch, 3)
    cfg = mla_config(True, True)
    w = random_weights(cfg)
    expected, _ = reference_calls(cfg, w, RNG_IDS)
    for target in ("functions", "portable", "ort"):
        calls, _ = run_steps(Runner(build(cfg, w, target)), RNG_IDS)
        for k, (mine, theirs) in enumerate(zip(calls, expected)):
            assert_close(mine, theirs, 1e-4, f"{target} fp32 call {k}")
    for target in ("portable", "ort"):
        for precision in ("fp16", "int8", "int4"):
            proto = build(cfg, w, target, precision)
            if precision != "fp16":  # every 2-D projection quantized (non-vacuous)
                kernel = "MatMulNBits" if target == "ort" else "DequantizeLinear"
                quantized = [n for n in proto.graph.node if n.op_type == kernel]
                assert len(quantized) >= 2 * 5 + 1, f"{target} {precision}: {len(quantized)}"
            calls, presents = run_steps(Runner(proto), RNG_IDS)
            for k, logits in enumerate(calls):
                assert np.isfinite(logits).all(), f"{target} {precision} call {k}"
            assert presents[-1]["present.1.latent"].shape == (2, PREFILL + DECODE, RANK)
            assert presents[-1]["present.1.rope_key"].shape == (2, PREFILL + DECODE, ROPE)
            # loose sanity: the quantized graph still computes this model
            error = np.abs(calls[-1] - expected[-1]).max()
            assert error < 0.5 * np.abs(expected[-1]).max(), f"{target} {precision}: {error}"


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_decode_equals_one_pass_and_padding(target):
    """(e) prefill N + decode K equals one pass over N + K; a left-padded batch equals its
    rows run alone."""
    cfg = mla_config(False, True)
    w = random_weights(cfg)
    runner = Runner(build(cfg, w, target))
    ids = RNG_IDS
    calls, _ = run_steps(runner, ids)
    whole, _, _ = runner(ids, np.ones_like(ids), runner.empty(2))
    stepped = np.concatenate(calls, axis=1)
    assert_close(stepped, whole.astype(np.float64), 1e-5, "stepped vs one pass")

    rows = [ids[0, :7], ids[1, :4]]
    padded = np.zeros((2, 7), np.int64)
    mask = np.zeros((2, 7), np.int64)
    for r, row in enumerate(rows):
        padded[r, 7 - len(row) :], mask[r, 7 - len(row) :] = row, 1
    nxt = ids[:, 7:8]
    batch_calls, _ = runner.steps(padded, mask, [nxt])
    for r, row in enumerate(rows):
        alone_calls, _ = runner.steps(row[None], np.ones((1, len(row)), np.int64), [nxt[r : r + 1]])
        real = batch_calls[0][r, 7 - len(row) :]
        assert_close(real, alone_calls[0][0].astype(np.float64), 1e-5, f"row {r} prefill")
        assert_close(batch_calls[1][r], alone_calls[1][0].astype(np.float64), 1e-5, f"row {r} step")


def test_lowering_is_recorded(monkeypatch):
    """GroupQueryAttention declines latent blocks ("latent attention"). By default an If
    picks absorbed or expanded by the call's length (both MatMuls); without it the absorbed
    MQA stays grouped MatMuls (reason recorded under Attention), the expanded form becomes
    one opset-23 Attention per layer; ``latent.ABSORBED_TO_ATTENTION`` sends the absorbed MQA
    to Attention too, computing the same logits. All said in ``inspect --explain``."""
    from graphattn.compiler import latent

    cfg = mla_config(True, True)
    proto = build(cfg, random_weights(cfg), "ort")
    decisions = json.loads({p.key: p.value for p in proto.metadata_props}[LOWERING_KEY])
    threshold = RANK * (NOPE + V) // (2 * RANK - NOPE - V) + 1
    assert decisions[0]["reasons"]["Attention"].startswith(
        f"an If picks absorbed (calls under {threshold} tokens)"
    )
    assert [n.op_type for n in proto.graph.node].count("If") == 2
    assert all(n.domain != "graphattn" for n in proto.graph.node)

    hybrid_from(monkeypatch, None)
    w = random_weights(cfg)

    def lowered(config):
        proto = build(config, w, "ort")
        metadata = {p.key: p.value for p in proto.metadata_props}
        ops = [n.op_type for n in proto.graph.node]
        return proto, json.loads(metadata[LOWERING_KEY]), ops, "\n".join(explain(metadata))

    proto, decisions, ops, text = lowered(cfg)
    assert [d["layer"] for d in decisions] == ["layers.0", "layers.1"]
    for decision in decisions:
        assert decision["kernel"] == "decomposed"
        assert decision["reasons"]["GroupQueryAttention"] == "latent attention"
        assert decision["reasons"]["Attention"].startswith("absorbed MQA over one latent head")
        assert decision["detail"].endswith("as grouped MatMuls")
    assert "Attention" not in ops and "GroupQueryAttention" not in ops
    assert "not GroupQueryAttention: latent attention" in text
    assert f"absorbed: MQA of {H} query heads over one [latent {RANK} | rope key {ROPE}]" in text
    grouped, _ = run_steps(Runner(proto), RNG_IDS)

    _, decisions, ops, text = lowered(mla_config(True, True, "expanded"))
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert decisions[0]["reasons"] == {"GroupQueryAttention": "latent attention"}
    assert ops.count("Attention") == 2 and f"expanded: MHA of {H} heads" in text

    monkeypatch.setattr(latent, "ABSORBED_TO_ATTENTION", True)
    proto, decisions, ops, _ = lowered(cfg)
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert ops.count("Attention") == 2
    attention, _ = run_steps(Runner(proto), RNG_IDS)
    for k, (a, b) in enumerate(zip(attention, grouped)):
        assert_close(a, b.astype(np.float64), 1e-5, f"Attention vs grouped call {k}")


def test_int4_keeps_the_per_head_up_projections_float():
    """3-D k_up/v_up stay float under int4 (the quantizers take 2-D weights); the 2-D
    projections become MatMulNBits."""
    cfg = mla_config(True, True)
    quantized = build(cfg, random_weights(cfg), "ort", "int4")
    floats = {t.name for t in quantized.graph.initializer if len(t.dims) == 3}
    assert {"layers.0.k_up.weight", "layers.0.v_up.weight"} <= floats
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 3 + 1  # per layer q_a+kv_a (packed), q_b, o; lm_head


def test_emitter_errors_name_the_problem():
    g = GraphEmitter("t")
    x = g.input("x", ir.DataType.FLOAT, ["B", "S", C])
    past = g.input("past_latent", ir.DataType.FLOAT, ["B", "P", RANK])
    rope = g.input("past_rope", ir.DataType.FLOAT, ["B", "P", ROPE])
    bias = g.input("bias", ir.DataType.FLOAT, ["B", 1, "S", "T"])
    cos = g.input("cos", ir.DataType.FLOAT, ["B", "S", ROPE // 2])
    tensors = graph_tensors(random_weights(mla_config(False, True, layers=1)))
    weights = {
        f"{r}_weight": g.initializer(f"w.{r}", tensors[f"layers.0.{r}.weight"])
        for r in ("q", "kv_a", "kv_a_norm", "k_up", "v_up", "o")
    }
    common = dict(
        bias_B1ST=bias,
        past_latent_BPR=past,
        past_rope_key_BPP=rope,
        cos_sin=(cos, cos),
        num_heads=H,
        kv_lora_rank=RANK,
        qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE,
        v_head_dim=V,
        name="attn",
    )
    with pytest.raises(ValueError, match="missing weights"):
        latent_attention_block(
            g, x, {k: v for k, v in weights.items() if k != "k_up_weight"}, **common
        )
    with pytest.raises(ValueError, match="with q_lora_rank: unexpected weights"):
        latent_attention_block(g, x, weights, **{**common, "q_lora_rank": 4})
    with pytest.raises(ValueError, match="v_up_weight must have shape"):
        latent_attention_block(g, x, weights, **{**common, "v_head_dim": V + 2})
    with pytest.raises(ValueError, match="form must be one of"):
        latent_attention_block(g, x, weights, **{**common, "form": "merged"})
    with pytest.raises(ValueError, match="needs cos_sin"):
        latent_attention_block(g, x, weights, **{**common, "cos_sin": None})
    out = latent_attention_block(g, x, weights, **common)
    assert len(out) == 3
