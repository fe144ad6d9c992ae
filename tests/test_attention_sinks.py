"""Attention sinks (GPT-OSS): every row's softmax holds one learned logit per query head that
mixes no value. The sinks score function and the attention block with a ``sinks`` weight are
checked against a float64 NumPy reference written with loops (windowed and full, GQA/MQA
heads, a left-padded batch, with and without a past) in onnxruntime and the interpreter; the
lowered block (``ort``: GroupQueryAttention's ``head_sink``; ``portable``: decomposed, since
opset-23 Attention has no sink) against the same reference, and in onnxruntime 1.30 where
the second venv exists."""

import json
import subprocess

import numpy as np
import numpy_reference as ref
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import assert_close, build, run_both
from old_runtime import OLD_PYTHON, needs_old_venv

from graphattn import ops
from graphattn.compiler import CompileOptions, compile_model
from graphattn.compiler.ort_version import (
    DEFAULT_ORT_VERSION,
    OLDEST_ORT_VERSION,
    has_head_sink,
)
from graphattn.ops.attention_block import self_attention_block
from graphattn.spec import LOWERING_KEY

HEADS, HIDDEN, HEAD_DIM = 4, 24, 16
ATOL = 2e-5


def sinks_attention_reference(q, k, v, keep, sinks, scale):
    """out [B, H, S, D] (float64): for each row, softmax over the kept keys' scores and the
    head's sink logit; the sink's share mixes nothing. A row that keeps no key is all sink: 0."""
    q, k, v, sinks = (np.asarray(a, dtype=np.float64) for a in (q, k, v, sinks))
    batch, heads, queries, dim = q.shape
    group = heads // k.shape[1]
    out = np.zeros((batch, heads, queries, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            for s in range(queries):
                kept = [t for t in range(k.shape[2]) if keep[b, 0, s, t]]
                logits = [scale * float(q[b, h, s] @ k[b, h // group, t]) for t in kept]
                logits.append(float(sinks[h]))
                top = max(logits)
                weights = [np.exp(x - top) for x in logits]
                total = sum(weights)
                for t, weight in zip(kept, weights):
                    out[b, h, s] += weight / total * v[b, h // group, t]
    return out


def left_padded_mask(batch: int, total: int) -> np.ndarray:
    """[B, T] int64: rows padded on the left by 0, 2, 1, ... positions."""
    mask = np.ones((batch, total), dtype=np.int64)
    for row, pads in enumerate([0, 2, 1, 3][:batch]):
        mask[row, :pads] = 0
    return mask


SINKS = np.array([1.5, -2.0, 0.3, 3.0], dtype=np.float32)  # strong and weak sinks
# (kv_heads, window, past_len, query_len)
CASES = [(4, None, 0, 6), (2, 3, 0, 6), (2, None, 5, 1), (1, 2, 5, 3), (2, 4, 4, 2)]


def _symbolic(feeds):
    dims = {"batch": "batch", "query": "sequence", "past": "past"}
    shapes = {
        "attention_mask": ["batch", "total_sequence"],
        "input_ids": ["batch", "sequence"],
        "x": [dims["batch"], dims["query"], HIDDEN],
    }
    for name in ("query", "key", "value", "past_key", "past_value"):
        if name in feeds:
            axis2 = "past" if name.startswith("past") else "sequence"
            shapes[name] = ["batch", feeds[name].shape[1], axis2, feeds[name].shape[3]]
    return {name: shape for name, shape in shapes.items() if name in feeds}


def function_case(kv_heads, window, past_len, query_len, batch=3):
    rng = np.random.default_rng(1000 * kv_heads + 10 * past_len + query_len)
    total = past_len + query_len

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    feeds = {
        "query": normal(batch, HEADS, query_len, HEAD_DIM),
        "key": normal(batch, kv_heads, query_len, HEAD_DIM),
        "value": normal(batch, kv_heads, query_len, HEAD_DIM),
        "past_key": normal(batch, kv_heads, past_len, HEAD_DIM),
        "past_value": normal(batch, kv_heads, past_len, HEAD_DIM),
        "sinks": SINKS,
        "attention_mask": left_padded_mask(batch, total),
        "input_ids": np.zeros((batch, query_len), dtype=np.int64),
    }

    def body(g, x):
        bias = ops.attention_bias(
            g, x["attention_mask"], x["input_ids"], causal=True, window=window
        )
        out, key, value = ops.scaled_dot_product_attention(
            g,
            x["query"],
            x["key"],
            x["value"],
            num_heads=HEADS,
            kv_heads=kv_heads,
            head_dim=HEAD_DIM,
            mask=bias,
            sinks_H=x["sinks"],
            past_key_BKPD=x["past_key"],
            past_value_BKPD=x["past_value"],
        )
        return {"output": out, "present_key": key, "present_value": value}

    proto = build(body, feeds, _symbolic(feeds))
    keep = ref.keep_mask(feeds["attention_mask"], query_len, causal=True, window=window)
    key_all = np.concatenate([feeds["past_key"], feeds["key"]], axis=2)
    value_all = np.concatenate([feeds["past_value"], feeds["value"]], axis=2)
    expected = sinks_attention_reference(
        feeds["query"], key_all, value_all, keep, SINKS, 1 / np.sqrt(HEAD_DIM)
    )
    return proto, feeds, expected, keep


@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-w{}-p{}-s{}".format(*c))
def test_sinks_function_matches_reference(case):
    proto, feeds, expected, keep = function_case(*case)
    names = [f.name for f in proto.functions]
    assert "ScaledDotProductAttentionSinks" in names and "MaskedSoftmaxMixSinks" in names
    for engine, results in zip(("onnxruntime", "interpreter"), run_both(proto, feeds)):
        # every row, padded ones included: a row with no key is all sink, so 0
        assert_close(results["output"], expected, ATOL, f"{engine} output")
    # the sinks matter: without them the rows that keep keys differ by far more than ATOL
    plain = ref.attention(
        feeds["query"],
        np.concatenate([feeds["past_key"], feeds["key"]], axis=2),
        np.concatenate([feeds["past_value"], feeds["value"]], axis=2),
        keep,
        1 / np.sqrt(HEAD_DIM),
    )
    rows = np.broadcast_to(keep.any(-1, keepdims=True), plain.shape)
    assert np.abs(np.where(rows, plain - expected, 0)).max() > 0.05


def test_sinks_emitter_checks_its_parameters():
    feeds = {
        "query": np.zeros((1, HEADS, 2, HEAD_DIM), np.float32),
        "key": np.zeros((1, 2, 2, HEAD_DIM), np.float32),
        "value": np.zeros((1, 2, 2, HEAD_DIM), np.float32),
        "sinks": SINKS,
        "wide": np.zeros(HEADS + 1, np.float32),
        "matrix": np.zeros((HEADS, 1), np.float32),
    }

    def attempt(sinks: str, **kw):
        def body(g, x):
            out, _, _ = ops.scaled_dot_product_attention(
                g, x["query"], x["key"], x["value"], num_heads=HEADS, kv_heads=2,
                head_dim=HEAD_DIM, causal=True, sinks_H=x[sinks], **kw,
            )  # fmt: skip
            return {"output": out}

        build(body, feeds)

    with pytest.raises(ValueError, match="one value per query head"):
        attempt("wide")
    with pytest.raises(ValueError, match="sinks must have rank 1"):
        attempt("matrix")
    with pytest.raises(ValueError, match="softcap or scalable softmax"):
        attempt("sinks", softcap=5.0)


# ------------------------------------------------------------------------- the block
def block_case(kv_heads, window, past_len, query_len, batch=3):
    """A sinks attention block (q/k/v/o with biases, no RoPE) on a left-padded batch."""
    rng = np.random.default_rng(7 + 100 * kv_heads + 10 * past_len + query_len)
    kv_width = kv_heads * HEAD_DIM

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    weights = {
        "q_weight": normal(HIDDEN, HEADS * HEAD_DIM, scale=0.4),
        "q_bias": normal(HEADS * HEAD_DIM, scale=0.1),
        "k_weight": normal(HIDDEN, kv_width, scale=0.4),
        "k_bias": normal(kv_width, scale=0.1),
        "v_weight": normal(HIDDEN, kv_width, scale=0.4),
        "v_bias": normal(kv_width, scale=0.1),
        "o_weight": normal(HEADS * HEAD_DIM, HIDDEN, scale=0.2),
        "o_bias": normal(HIDDEN, scale=0.1),
        "sinks": SINKS,
    }
    total = past_len + query_len
    feeds = {
        "x": normal(batch, query_len, HIDDEN),
        "attention_mask": left_padded_mask(batch, total),
        "input_ids": np.zeros((batch, query_len), dtype=np.int64),
        "past_key": normal(batch, kv_heads, past_len, HEAD_DIM),
        "past_value": normal(batch, kv_heads, past_len, HEAD_DIM),
    }

    def body(g, x):
        bias = ops.attention_bias(
            g, x["attention_mask"], x["input_ids"], causal=True, window=window
        )
        values = {role: g.initializer(f"layers.0.{role}", array) for role, array in weights.items()}
        out, key, value = self_attention_block(
            g,
            x["x"],
            values,
            bias_B1ST=bias,
            past_key_BKPD=x["past_key"],
            past_value_BKPD=x["past_value"],
            num_heads=HEADS,
            kv_heads=kv_heads,
            head_dim=HEAD_DIM,
            window=window,
            name="layers.0/attn",
        )
        return {"output": (out, 3), "present_key": key, "present_value": value}

    proto = build(body, feeds, _symbolic(feeds))

    def heads(y, count):
        return y.reshape(batch, query_len, count, HEAD_DIM).transpose(0, 2, 1, 3)

    x64 = feeds["x"].astype(np.float64)
    q, k, v = (
        heads(x64 @ weights[f"{p}_weight"] + weights[f"{p}_bias"], n)
        for p, n in (("q", HEADS), ("k", kv_heads), ("v", kv_heads))
    )
    key_all = np.concatenate([feeds["past_key"], k], axis=2)
    value_all = np.concatenate([feeds["past_value"], v], axis=2)
    keep = ref.keep_mask(feeds["attention_mask"], query_len, causal=True, window=window)
    mixed = sinks_attention_reference(q, key_all, value_all, keep, SINKS, 1 / np.sqrt(HEAD_DIM))
    merged = mixed.transpose(0, 2, 1, 3).reshape(batch, query_len, HEADS * HEAD_DIM)
    expected = {
        "output": merged @ weights["o_weight"] + weights["o_bias"],
        "present_key": key_all,
        "present_value": value_all,
    }
    return proto, feeds, expected


def check_block(results, expected, what):
    for name, want in expected.items():
        assert_close(results[name], want, ATOL, f"{what} {name}")


def lowered(proto, target: str, ort_version: str = DEFAULT_ORT_VERSION):
    """``(proto lowered for target, per-layer lowering decisions)``."""
    model = ir.serde.deserialize_model(proto)
    compile_model(model, CompileOptions(target, ort_version=ort_version))
    decisions = json.loads(model.metadata_props[LOWERING_KEY])
    return ir.serde.serialize_model(model), decisions


def run_ort(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-w{}-p{}-s{}".format(*c))
def test_sinks_block_matches_reference(case):
    proto, feeds, expected = block_case(*case)
    assert any(f.name == "SelfAttention_qkv_bias_o_bias_sinks" for f in proto.functions)
    call = next(n for n in proto.graph.node if n.op_type.startswith("SelfAttention"))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in call.attribute}
    assert attrs["sinks"] == 1 and b"sinks" in attrs["input_roles"]
    for engine, results in zip(("onnxruntime", "interpreter"), run_both(proto, feeds)):
        check_block(results, expected, engine)


# GroupQueryAttention on CPU refuses a batch of several rows continuing several tokens after a
# past without query_seqlens (1.32+): those cases run in the 1.32 lowering only.
ONE_CALL_CASES = [c for c in CASES if c[2] == 0 or c[3] == 1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "kv{}-w{}-p{}-s{}".format(*c))
def test_lowered_sinks_block_matches_reference(case):
    proto, feeds, expected = block_case(*case)
    portable, decisions = lowered(proto, "portable")
    assert decisions == [
        {
            "layer": "layers.0",
            "kernel": "decomposed",
            "reasons": {
                "Attention": "attention sinks: opset-23 Attention has no per-head softmax sink"
                " logit"
            },
        }
    ]
    check_block(run_ort(portable, feeds), expected, "portable")
    for version in ("1.30", "1.32"):
        if version == "1.30" and case not in ONE_CALL_CASES:
            continue
        graph, decisions = lowered(proto, "ort", version)
        assert [d["kernel"] for d in decisions] == ["GroupQueryAttention"]
        gqa = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == 1 and gqa[0].input[11] == "layers.0.sinks"  # head_sink
        assert len(gqa[0].input) == (17 if version == "1.32" else 12)
        check_block(run_ort(graph, feeds), expected, f"ort {version}")


def test_every_lowered_version_has_head_sink():
    assert has_head_sink(OLDEST_ORT_VERSION) and has_head_sink(DEFAULT_ORT_VERSION)


_OLD_RUN = """
import json, sys
import numpy as np, onnxruntime
feeds = dict(np.load(sys.argv[2]))
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
names = [o.name for o in session.get_outputs()]
np.savez(sys.argv[3], **dict(zip(names, session.run(names, feeds))))
print(json.dumps({"version": onnxruntime.__version__}))
"""


def run_in_old_onnxruntime(python, proto, feeds, tmp_path):
    """Outputs of ``proto`` run by ``python``'s onnxruntime (a subprocess), and its version."""
    model, inputs, outputs = tmp_path / "m.onnx", tmp_path / "in.npz", tmp_path / "out.npz"
    model.write_bytes(proto.SerializeToString())
    np.savez(inputs, **feeds)
    done = subprocess.run(
        [str(python), "-c", _OLD_RUN, str(model), str(inputs), str(outputs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(np.load(outputs)), json.loads(done.stdout.strip().splitlines()[-1])["version"]


@needs_old_venv
@pytest.mark.parametrize("case", ONE_CALL_CASES, ids=lambda c: "kv{}-w{}-p{}-s{}".format(*c))
def test_head_sink_in_onnxruntime_1_30(case, tmp_path):
    proto, feeds, expected = block_case(*case)
    graph, _ = lowered(proto, "ort", "1.30")
    results, version = run_in_old_onnxruntime(OLD_PYTHON, graph, feeds, tmp_path)
    assert version.startswith("1.30")
    check_block(results, expected, "onnxruntime 1.30")
