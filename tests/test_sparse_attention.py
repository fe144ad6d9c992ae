"""Native sparse attention and sparse routed attention against the float64 loop reference
(``numpy_sparse_reference``), in onnxruntime and in the NumPy interpreter.

Axes: batch 1/2; prefill lengths that are not a multiple of the block, decode (S = 1) after a
past; heads/kv_heads 4/4, 4/2, 4/1; block/segment sizes 2..5; top-c/f/k below, at and above
what exists; no padding and left padding. Inputs are drawn from a seed that is searched
deterministically until every selection in the reference wins by a margin of at least
``MARGIN`` (so fp32 rounding cannot flip a TopK choice). Pad queries (they see no key) have no
defined output: checked finite, the others compared in full. Prefill N then decode K with the
cache equals one pass over N + K; a left-padded row equals the row alone.
"""

import numpy as np
import numpy_sparse_reference as ref
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from harness import assert_close, build, run_both

from graphattn.ops import GraphEmitter
from graphattn.ops.sparse_attention import native_sparse_attention, sparse_routed_attention

ATOL = 2e-5
MARGIN = 1e-4
DIM = 16
ROTARY_HALF = 6  # partial RoPE: 12 of 16 channels rotate


def left_mask(batch: int, total: int, pads: tuple[int, ...]) -> np.ndarray:
    mask = np.ones((batch, total), dtype=np.int64)
    for row, count in enumerate(pads[:batch]):
        mask[row, :count] = 0
    return mask


def draw(rng, batch, heads, kv_heads, length, past):
    total = past + length
    shapes = {
        "query": (batch, heads, length, DIM),
        "key": (batch, kv_heads, length, DIM),
        "value": (batch, kv_heads, length, DIM),
    }
    if past:
        shapes["past_key"] = shapes["past_value"] = (batch, kv_heads, past, DIM)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return feeds, total


def all_keys(feeds, name):
    past = feeds.get(f"past_{name}")
    return feeds[name] if past is None else np.concatenate([past, feeds[name]], axis=2)


def symbolic_shapes(feeds):
    shapes = {}
    for name, array in feeds.items():
        if array.ndim == 4:
            length = "past" if name.startswith("past") else "sequence"
            shapes[name] = ["batch", array.shape[1], length, array.shape[3]]
    shapes["attention_mask"] = ["batch", "total"]
    for name in ("cos", "sin"):
        if name in feeds:
            shapes[name] = ["batch", "total", ROTARY_HALF]
    if "gate_coarse" in feeds and feeds["gate_coarse"].ndim == 3:
        for name in ("gate_coarse", "gate_fine", "gate_window"):
            shapes[name] = ["batch", "sequence", feeds[name].shape[2]]
    return shapes


# ------------------------------------------------------------------------------------ NSA
def half_build(body, feeds):
    """``harness.build`` for a float16 graph: float inputs and the output in float16."""
    g = GraphEmitter("float16")
    inputs = {}
    for name, array in feeds.items():
        dtype = ir.DataType.INT64 if array.dtype == np.int64 else ir.DataType.FLOAT16
        inputs[name] = g.input(name, dtype, list(array.shape))
    g.output(body(g, inputs)["output"], "output", ir.DataType.FLOAT16, [None] * 4)
    proto = ir.serde.serialize_model(g.model())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def nsa_graph(
    feeds, heads, kv_heads, block, top_blocks, top_tokens, window, selection="head", dtype=None
):
    def body(g, x):
        out, present_key, present_value = native_sparse_attention(
            g,
            x["query"],
            x["key"],
            x["value"],
            gate_coarse=x["gate_coarse"],
            gate_fine=x["gate_fine"],
            gate_window=x["gate_window"],
            num_heads=heads,
            kv_heads=kv_heads,
            head_dim=DIM,
            block_size=block,
            top_blocks=top_blocks,
            top_tokens=top_tokens,
            window=window,
            selection=selection,
            attention_mask_BT=x["attention_mask"],
            past_key_BKPD=x.get("past_key"),
            past_value_BKPD=x.get("past_value"),
        )
        return {"output": out, "present_key": present_key, "present_value": present_value}

    if dtype == ir.DataType.FLOAT16:
        return half_build(body, feeds)
    return build(body, feeds, symbolic_shapes(feeds))


def nsa_case(
    batch,
    heads,
    kv_heads,
    length,
    past,
    block,
    top_blocks,
    top_tokens,
    window,
    pads,
    gate_form="head",
    selection="head",
    margin=MARGIN,
):
    """(feeds, expected [B, H, S, D], margin) from the first seed whose selections are clear."""
    for seed in range(50):
        rng = np.random.default_rng([seed, batch, heads, kv_heads, length, past, block])
        feeds, total = draw(rng, batch, heads, kv_heads, length, past)
        feeds["attention_mask"] = left_mask(batch, total, pads)
        if gate_form == "head":
            logits = rng.standard_normal((3, heads)).astype(np.float32)
            gates = [np.broadcast_to(g[None, :, None], (batch, heads, length)) for g in logits]
        else:
            logits = rng.standard_normal((3, batch, length, heads)).astype(np.float32)
            gates = [g.transpose(0, 2, 1) for g in logits]
        for name, value in zip(("gate_coarse", "gate_fine", "gate_window"), logits):
            feeds[name] = value
        expected, found = ref.native_sparse_attention(
            feeds["query"],
            all_keys(feeds, "key"),
            all_keys(feeds, "value"),
            feeds["attention_mask"],
            gates,
            block,
            top_blocks,
            top_tokens,
            window,
            DIM**-0.5,
            shared=selection == "group",
        )
        if found >= margin:
            return feeds, expected
    raise AssertionError("no seed gives selections clear of fp32 rounding")


def compare(results, feeds, expected, label):
    output = results["output"]
    assert np.isfinite(output).all(), f"{label}: non-finite output"
    defined = ~np.isnan(expected)
    assert_close(
        np.where(defined, output, 0), np.where(defined, expected, 0), ATOL, f"{label} output"
    )
    assert_close(results["present_key"], all_keys(feeds, "key"), 0.0, f"{label} present_key")
    assert_close(results["present_value"], all_keys(feeds, "value"), 0.0, f"{label} present_value")


NSA_CASES = [
    # batch, heads, kv_heads, length, past, block, top_blocks, top_tokens, window, left pads
    (1, 4, 2, 13, 0, 4, 2, 5, 3, ()),  # prefill, 13 not a multiple of 4
    (2, 4, 1, 11, 0, 3, 3, 4, 4, (3, 0)),  # MQA, left padding
    (2, 4, 2, 1, 17, 4, 2, 3, 5, (0, 5)),  # decode after a past, padded row
    (1, 4, 4, 3, 20, 5, 1, 8, 2, ()),  # MHA, one block, several queries after a past
    (2, 4, 2, 1, 6, 2, 10, 50, 40, (2, 0)),  # c, f, W beyond what exists: take everything
    (1, 4, 2, 1, 0, 3, 2, 2, 2, ()),  # a single token
    (2, 4, 2, 4, 7, 3, 2, 3, 3, (2, 5)),  # a chunk after a past, both rows padded
]


@pytest.mark.parametrize(
    "case", NSA_CASES, ids=lambda c: "b{}-h{}-kv{}-s{}-p{}-L{}-c{}-f{}-w{}-pad{}".format(*c)
)
@pytest.mark.parametrize("selection", ["head", "group"])
def test_native_sparse_attention_matches_reference(case, selection):
    batch, heads, kv_heads, length, past, block, top_blocks, top_tokens, window, pads = case
    feeds, expected = nsa_case(*case, selection=selection)
    proto = nsa_graph(feeds, heads, kv_heads, block, top_blocks, top_tokens, window, selection)
    from_ort, from_interpreter = run_both(proto, feeds)
    compare(from_ort, feeds, expected, "onnxruntime")
    compare(from_interpreter, feeds, expected, "interpreter")


def test_native_sparse_attention_per_token_gates():
    """Gates [B, S, H] (a projection of the hidden state) instead of per-head logits [H]."""
    case = (2, 4, 2, 7, 4, 3, 2, 4, 3, (2, 0))
    feeds, expected = nsa_case(*case, gate_form="token")
    proto = nsa_graph(feeds, 4, 2, 3, 2, 4, 3)
    from_ort, from_interpreter = run_both(proto, feeds)
    compare(from_ort, feeds, expected, "onnxruntime")
    compare(from_interpreter, feeds, expected, "interpreter")


# --------------------------------------------------------------------------------- routed
def inverse_frequencies(half: int) -> np.ndarray:
    return (10000.0 ** (-np.arange(half) / half)).astype(np.float32)


def rope_tables(positions: np.ndarray):
    angles = positions[..., None].astype(np.float64) * inverse_frequencies(ROTARY_HALF)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def routed_graph(feeds, heads, kv_heads, segment, top_k, interleaved, selection="head", dtype=None):
    def body(g, x):
        out, present_key, present_value = sparse_routed_attention(
            g,
            x["query"],
            x["key"],
            x["value"],
            cos_BTR=x["cos"],
            sin_BTR=x["sin"],
            num_heads=heads,
            kv_heads=kv_heads,
            head_dim=DIM,
            segment_size=segment,
            top_k=top_k,
            interleaved=interleaved,
            selection=selection,
            attention_mask_BT=x["attention_mask"],
            past_key_BKPD=x.get("past_key"),
            past_value_BKPD=x.get("past_value"),
        )
        return {"output": out, "present_key": present_key, "present_value": present_value}

    if dtype == ir.DataType.FLOAT16:
        return half_build(body, feeds)
    return build(body, feeds, symbolic_shapes(feeds))


def routed_case(
    batch,
    heads,
    kv_heads,
    length,
    past,
    segment,
    top_k,
    interleaved,
    pads,
    selection="head",
    margin=MARGIN,
):
    for seed in range(50):
        rng = np.random.default_rng([seed, batch, heads, kv_heads, length, past, segment, 7])
        feeds, total = draw(rng, batch, heads, kv_heads, length, past)
        mask = left_mask(batch, total, pads)
        feeds["attention_mask"] = mask
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        feeds["cos"], feeds["sin"] = rope_tables(positions)
        expected, found = ref.sparse_routed_attention(
            feeds["query"],
            all_keys(feeds, "key"),
            all_keys(feeds, "value"),
            mask,
            positions,
            inverse_frequencies(ROTARY_HALF),
            segment,
            top_k,
            DIM**-0.5,
            interleaved,
            shared=selection == "group",
        )
        if found >= margin:
            return feeds, expected
    raise AssertionError("no seed gives selections clear of fp32 rounding")


ROUTED_CASES = [
    # batch, heads, kv_heads, length, past, segment, top_k, interleaved, left pads
    (1, 4, 2, 14, 0, 4, 2, False, ()),
    (2, 4, 1, 9, 0, 3, 2, True, (2, 0)),
    (2, 4, 2, 1, 19, 4, 3, False, (0, 6)),
    (1, 4, 4, 2, 11, 5, 1, True, ()),
    (2, 4, 2, 1, 5, 2, 9, False, (1, 0)),  # k beyond the segments: every segment
    (2, 4, 2, 3, 8, 3, 2, True, (4, 1)),  # a chunk after a past, both rows padded
]


@pytest.mark.parametrize(
    "case", ROUTED_CASES, ids=lambda c: "b{}-h{}-kv{}-s{}-p{}-L{}-k{}-il{}-pad{}".format(*c)
)
@pytest.mark.parametrize("selection", ["head", "group"])
def test_sparse_routed_attention_matches_reference(case, selection):
    batch, heads, kv_heads, length, past, segment, top_k, interleaved, pads = case
    feeds, expected = routed_case(*case, selection=selection)
    proto = routed_graph(feeds, heads, kv_heads, segment, top_k, interleaved, selection)
    from_ort, from_interpreter = run_both(proto, feeds)
    compare(from_ort, feeds, expected, "onnxruntime")
    compare(from_interpreter, feeds, expected, "interpreter")


# ------------------------------------------------------------------ cache and padding rules
def ort_run(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def step_feeds(full, start, stop, past):
    """Feeds for positions start..stop of ``full`` (one pass inputs) after ``past``."""
    feeds = {name: full[name][:, :, start:stop] for name in ("query", "key", "value")}
    feeds["past_key"], feeds["past_value"] = past
    feeds["attention_mask"] = full["attention_mask"][:, :stop]
    for name in ("cos", "sin"):
        if name in full:
            feeds[name] = full[name][:, :stop]
    for name in ("gate_coarse", "gate_fine", "gate_window"):
        if name in full:
            feeds[name] = full[name]
    return feeds


@pytest.mark.parametrize("selection", ["head", "group"])
@pytest.mark.parametrize("kind", ["nsa", "routed"])
def test_prefill_then_decode_equals_one_pass(kind, selection):
    """Prefill 9 tokens, then 5 single-token steps through the cache, equal one pass over 14
    (left-padded batch of 2)."""
    rng = np.random.default_rng(14)
    batch, heads, kv_heads, prefill, steps = 2, 4, 2, 9, 5
    total = prefill + steps
    full = {
        "query": rng.standard_normal((batch, heads, total, DIM)).astype(np.float32),
        "key": rng.standard_normal((batch, kv_heads, total, DIM)).astype(np.float32),
        "value": rng.standard_normal((batch, kv_heads, total, DIM)).astype(np.float32),
        "attention_mask": left_mask(batch, total, (3, 0)),
    }
    empty = np.zeros((batch, kv_heads, 0, DIM), dtype=np.float32)
    if kind == "nsa":
        for name in ("gate_coarse", "gate_fine", "gate_window"):
            full[name] = rng.standard_normal(heads).astype(np.float32)
        proto = nsa_graph(
            {**full, "past_key": empty, "past_value": empty}, heads, kv_heads, 3, 2, 4, 3, selection
        )
    else:
        positions = np.maximum(np.cumsum(full["attention_mask"], axis=1) - 1, 0)
        full["cos"], full["sin"] = rope_tables(positions)
        proto = routed_graph(
            {**full, "past_key": empty, "past_value": empty},
            heads,
            kv_heads,
            3,
            2,
            False,
            selection,
        )
    one_pass = ort_run(proto, step_feeds(full, 0, total, (empty, empty)))
    result = ort_run(proto, step_feeds(full, 0, prefill, (empty, empty)))
    outputs = [result["output"]]
    for position in range(prefill, total):
        past = (result["present_key"], result["present_value"])
        result = ort_run(proto, step_feeds(full, position, position + 1, past))
        outputs.append(result["output"])
    stepped = np.concatenate(outputs, axis=2)
    real = full["attention_mask"][:, None, :, None].astype(bool)
    assert_close(
        np.where(real, stepped, 0),
        np.where(real, one_pass["output"], 0).astype(np.float64),
        1e-5,
        f"{kind} stepped",
    )
    assert_close(one_pass["present_key"], full["key"], 0.0, f"{kind} present_key")


@pytest.mark.parametrize("kind", ["nsa", "routed"])
def test_left_padded_row_equals_row_alone(kind):
    """Blocks count from a row's first real token: 4 pads in front change nothing."""
    if kind == "nsa":
        feeds, _ = nsa_case(2, 4, 2, 10, 0, 3, 2, 3, 3, (4, 0))
        proto = nsa_graph(feeds, 4, 2, 3, 2, 3, 3)
    else:
        feeds, _ = routed_case(2, 4, 2, 10, 0, 3, 2, False, (4, 0))
        proto = routed_graph(feeds, 4, 2, 3, 2, False)
    batch_out = ort_run(proto, feeds)["output"]
    alone = {name: value[:1, :, 4:] for name, value in feeds.items() if value.ndim == 4}
    alone["attention_mask"] = feeds["attention_mask"][:1, 4:]
    for name in ("cos", "sin"):
        if name in feeds:
            alone[name] = feeds[name][:1, 4:]
    for name in ("gate_coarse", "gate_fine", "gate_window"):
        if name in feeds:
            alone[name] = feeds[name]  # per-head logits [H]
    alone_out = ort_run(proto, alone)["output"]
    assert_close(batch_out[:1, :, 4:], alone_out.astype(np.float64), 1e-6, f"{kind} padded row")


# ------------------------------------------------------------------------ lowering, errors
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_lowered_graph_uses_standard_ops_and_matches(target):
    """The compiler's targets inline the functions into default-domain ops (no contrib kernel
    exists for these), and the result still matches the reference."""
    from graphattn.compiler import CompileOptions, compile_model

    case = (2, 4, 2, 1, 17, 4, 2, 3, 5, (0, 5))
    feeds, expected = nsa_case(*case)
    proto = nsa_graph(feeds, 4, 2, 4, 2, 3, 5)
    model = ir.serde.deserialize_model(proto)
    compile_model(model, CompileOptions(target))
    lowered = ir.serde.serialize_model(model)
    assert not lowered.functions
    domains = {node.domain for node in lowered.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    onnx.checker.check_model(lowered)
    compare(ort_run(lowered, feeds), feeds, expected, target)


def _emitter_inputs(heads=4, kv_heads=2, gate_shape=(4,)):
    g = GraphEmitter("errors")
    f32 = ir.DataType.FLOAT
    q = g.input("q", f32, ["b", heads, "s", DIM])
    k = g.input("k", f32, ["b", kv_heads, "s", DIM])
    v = g.input("v", f32, ["b", kv_heads, "s", DIM])
    gate = g.input("gate", f32, list(gate_shape))
    return g, q, k, v, gate


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"block_size": 0}, "block_size must be an int >= 1"),
        ({"top_blocks": 1.5}, "top_blocks must be an int >= 1"),
        ({"window": True}, "window must be an int >= 1"),
        ({"kv_heads": 3}, "kv_heads=3 must divide num_heads=4"),
        ({"num_heads": 8}, "query has 4 heads on axis 1, expected 8"),
        ({"scale": -1.0}, "scale must be a positive number"),
    ],
)
def test_nsa_emitter_refuses(overrides, message):
    g, q, k, v, gate = _emitter_inputs()
    kwargs = dict(
        num_heads=4, kv_heads=2, head_dim=DIM, block_size=4, top_blocks=2, top_tokens=4, window=3
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        native_sparse_attention(
            g, q, k, v, gate_coarse=gate, gate_fine=gate, gate_window=gate, **kwargs
        )


def test_nsa_emitter_refuses_gate_shapes():
    g, q, k, v, gate = _emitter_inputs(gate_shape=(3,))
    with pytest.raises(
        ValueError, match=r"gate_coarse must have one logit per query head \(4\), got 3"
    ):
        native_sparse_attention(
            g,
            q,
            k,
            v,
            gate_coarse=gate,
            gate_fine=gate,
            gate_window=gate,
            num_heads=4,
            kv_heads=2,
            head_dim=DIM,
            block_size=4,
            top_blocks=2,
            top_tokens=4,
            window=3,
        )
    g, q, k, v, gate = _emitter_inputs(gate_shape=(1, 4))
    with pytest.raises(ValueError, match="gate_coarse must be"):
        native_sparse_attention(
            g,
            q,
            k,
            v,
            gate_coarse=gate,
            gate_fine=gate,
            gate_window=gate,
            num_heads=4,
            kv_heads=2,
            head_dim=DIM,
            block_size=4,
            top_blocks=2,
            top_tokens=4,
            window=3,
        )


@pytest.mark.parametrize(
    "overrides,cos_shape,message",
    [
        ({"segment_size": 0}, ["b", "t", 4], "segment_size must be an int >= 1"),
        ({"top_k": -2}, ["b", "t", 4], "top_k must be an int >= 1"),
        ({}, ["b", "t", 9], "cos/sin have 9 frequencies"),
        ({}, ["b", 4], "cos must have rank 3"),
    ],
)
def test_routed_emitter_refuses(overrides, cos_shape, message):
    g, q, k, v, _ = _emitter_inputs()
    cos = g.input("cos", ir.DataType.FLOAT, cos_shape)
    kwargs = dict(num_heads=4, kv_heads=2, head_dim=DIM, segment_size=4, top_k=2)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        sparse_routed_attention(g, q, k, v, cos_BTR=cos, sin_BTR=cos, **kwargs)


@pytest.mark.parametrize("length,past", [(1, 9), (5, 3)], ids=["decode", "prefill"])
@pytest.mark.parametrize("kind", ["nsa", "routed"])
def test_float16_graph_matches_reference(kind, length, past):
    """The functions are dtype-generic (CastLike throughout): a float16 graph in onnxruntime
    matches the float64 reference to 5e-3 (seeds chosen with margins >= 1e-2 for float16)."""
    if kind == "nsa":
        feeds, expected = nsa_case(1, 4, 2, length, past, 3, 2, 4, 3, (), margin=1e-2)
        proto = nsa_graph(feeds, 4, 2, 3, 2, 4, 3, dtype=ir.DataType.FLOAT16)
    else:
        feeds, expected = routed_case(1, 4, 2, length, past, 3, 2, False, (), margin=1e-2)
        proto = routed_graph(feeds, 4, 2, 3, 2, False, dtype=ir.DataType.FLOAT16)
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    output = ort_run(proto, half)["output"].astype(np.float64)
    assert np.isfinite(output).all()
    assert_close(output, expected, 5e-3, f"{kind} float16 output")
