"""The attention sweep: every case runs in onnxruntime CPU and the NumPy interpreter, and both
must match the independent NumPy reference (fp32 max abs error <= 1e-5).

Axes: batch 1/3; query length 1 (decode) and 4; past 0 and 5; H=8 with kv_heads 8/2/1;
head_dim 64 and 40; window none and 3; softcap off and on; left and right padding.
Rows whose query attends no key at all (a pad query with only pads before it) have no defined
value: they are checked to be finite, every other row is compared in full.
"""

import itertools

import numpy as np
import numpy_reference as ref
import pytest
from harness import assert_close, build, run_both

from graphattn import ops

ATOL = 1e-5
HEADS = 8
CASES = list(
    itertools.product(
        [1, 3],  # batch
        [1, 4],  # query length
        [0, 5],  # past length
        [8, 2, 1],  # kv heads
        [64, 40],  # head_dim
        [None, 3],  # window
        [None, 2.0],  # softcap
        ["left", "right"],  # padding
    )
)


def padded_mask(batch: int, total: int, side: str) -> np.ndarray:
    """[B, T] int64 with 1, 0, 2 pads on rows 0, 1, 2 (never all of a row)."""
    mask = np.ones((batch, total), dtype=np.int64)
    for row, pads in enumerate([1, 0, 2][:batch]):
        pads = min(pads, total - 1)
        if pads:
            if side == "left":
                mask[row, :pads] = 0
            else:
                mask[row, total - pads :] = 0
    return mask


def attention_case(
    batch, query_len, past_len, kv_heads, head_dim, window, softcap, side, ssmax_s=None
):
    rng = np.random.default_rng(hash((batch, query_len, past_len, kv_heads, head_dim)) % 2**32)
    total = past_len + query_len
    feeds = {
        "query": rng.standard_normal((batch, HEADS, query_len, head_dim), dtype=np.float32),
        "key": rng.standard_normal((batch, kv_heads, query_len, head_dim), dtype=np.float32),
        "value": rng.standard_normal((batch, kv_heads, query_len, head_dim), dtype=np.float32),
        "attention_mask": padded_mask(batch, total, side),
        "input_ids": np.zeros((batch, query_len), dtype=np.int64),
    }
    if past_len:
        feeds["past_key"] = rng.standard_normal(
            (batch, kv_heads, past_len, head_dim), dtype=np.float32
        )
        feeds["past_value"] = rng.standard_normal(
            (batch, kv_heads, past_len, head_dim), dtype=np.float32
        )
    symbolic = {
        name: [
            "batch",
            array.shape[1],
            "sequence" if name in ("query", "key", "value") else "past",
            array.shape[3],
        ]
        for name, array in feeds.items()
        if array.ndim == 4
    }
    symbolic["attention_mask"] = ["batch", "total_sequence"]
    symbolic["input_ids"] = ["batch", "sequence"]

    def body(g, x):
        bias = ops.attention_bias(
            g, x["attention_mask"], x["input_ids"], causal=True, window=window
        )
        out, present_key, present_value = ops.scaled_dot_product_attention(
            g,
            x["query"],
            x["key"],
            x["value"],
            num_heads=HEADS,
            kv_heads=kv_heads,
            head_dim=head_dim,
            mask=bias,
            softcap=softcap,
            ssmax_s=ssmax_s,
            past_key_BKPD=x.get("past_key"),
            past_value_BKPD=x.get("past_value"),
        )
        return {"output": out, "present_key": present_key, "present_value": present_value}

    proto = build(body, feeds, symbolic)
    keep = ref.keep_mask(feeds["attention_mask"], query_len, causal=True, window=window)
    key_all = np.concatenate([feeds.get("past_key", feeds["key"][:, :, :0]), feeds["key"]], axis=2)
    value_all = np.concatenate(
        [feeds.get("past_value", feeds["value"][:, :, :0]), feeds["value"]], axis=2
    )
    expected = ref.attention(
        feeds["query"], key_all, value_all, keep, 1 / np.sqrt(head_dim), softcap, ssmax_s
    )
    return proto, feeds, expected, key_all, value_all, keep


def check_against_reference(results, expected, key_all, value_all, keep, label):
    defined_rows = np.broadcast_to(keep.any(axis=-1, keepdims=True), expected.shape)
    output = results["output"]
    assert np.isfinite(output).all(), f"{label}: non-finite output"
    assert_close(
        np.where(defined_rows, output, 0),
        np.where(defined_rows, expected, 0),
        ATOL,
        f"{label} output",
    )
    assert_close(results["present_key"], key_all, 0.0, f"{label} present_key")
    assert_close(results["present_value"], value_all, 0.0, f"{label} present_value")


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "b{}-s{}-p{}-kv{}-d{}-w{}-cap{}-{}".format(*c)
)
def test_attention_matches_reference(case):
    proto, feeds, expected, key_all, value_all, keep = attention_case(*case)
    from_ort, from_interpreter = run_both(proto, feeds)
    check_against_reference(from_ort, expected, key_all, value_all, keep, "onnxruntime")
    check_against_reference(from_interpreter, expected, key_all, value_all, keep, "interpreter")


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("kv_heads,window,past_len", [(8, None, 0), (2, 3, 5), (1, None, 5)])
def test_scalable_softmax_matches_reference(softcap, kv_heads, window, past_len):
    proto, feeds, expected, key_all, value_all, keep = attention_case(
        3, 4, past_len, kv_heads, 40, window, softcap, "left", ssmax_s=0.7
    )
    from_ort, from_interpreter = run_both(proto, feeds)
    check_against_reference(from_ort, expected, key_all, value_all, keep, "onnxruntime")
    check_against_reference(from_interpreter, expected, key_all, value_all, keep, "interpreter")
