"""RoPE sweep: split-halves and interleaved, full and partial, scaled frequencies, positions with
an offset (decode after a past) and from a padded attention_mask — onnxruntime and interpreter
against the independent NumPy reference (fp32 max abs error <= 1e-5)."""

import itertools

import numpy as np
import numpy_reference as ref
import pytest
from harness import INT64, assert_close, build, run_both

from graphattn import ops

SCALINGS = {
    "none": None,
    "linear": {"type": "linear", "factor": 4.0},
    "llama3": {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize(
    "batch,query_len,past_len,head_dim,rotary_fraction,interleaved,scaling",
    list(itertools.product([1, 3], [1, 4], [0, 5], [64, 40], [1.0, 0.5], [False, True], SCALINGS)),
)
def test_rotary_matches_reference(
    batch, query_len, past_len, head_dim, rotary_fraction, interleaved, scaling
):
    rng = np.random.default_rng(7)
    rotary_dim = int(head_dim * rotary_fraction) // 2 * 2
    positions = past_len + np.arange(query_len)[None, :] + np.arange(batch)[:, None] * 3
    feeds = {
        "x": rng.standard_normal((batch, 8, query_len, head_dim), dtype=np.float32),
        "position_ids": positions.astype(np.int64),
    }

    def body(g, x):
        cos, sin = ops.rotary_cos_sin(
            g, x["position_ids"], rotary_dim=rotary_dim, theta=10000.0, scaling=SCALINGS[scaling]
        )
        rotated = ops.apply_rotary(
            g,
            x["x"],
            cos,
            sin,
            head_dim=head_dim,
            rotary_dim=rotary_dim,
            interleaved=interleaved,
            name="rotate",
        )
        return {"rotated": rotated}

    proto = build(
        body,
        feeds,
        {"x": ["batch", 8, "sequence", head_dim], "position_ids": ["batch", "sequence"]},
    )
    inv_freq = ref.inverse_frequencies(rotary_dim, 10000.0, SCALINGS[scaling])
    expected = ref.rope(feeds["x"], feeds["position_ids"], inv_freq, interleaved)
    for label, results in zip(("onnxruntime", "interpreter"), run_both(proto, feeds)):
        assert_close(results["rotated"], expected, 1e-5, f"{label} rotated")


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_inverse_frequencies_match_reference(scaling):
    ours = ops.inverse_frequencies(96, 500000.0, SCALINGS[scaling])
    expected = ref.inverse_frequencies(96, 500000.0, SCALINGS[scaling])
    np.testing.assert_allclose(
        ours, expected, rtol=1e-6, atol=0, err_msg=scaling
    )  # float32 rounding


def test_llama3_scaling_changes_only_low_frequencies():
    plain = ops.inverse_frequencies(64, 500000.0)
    scaled = ops.inverse_frequencies(64, 500000.0, SCALINGS["llama3"])
    assert scaled[0] == plain[0]  # highest frequency untouched
    assert np.isclose(scaled[-1], plain[-1] / 8.0)  # lowest divided by the factor


@pytest.mark.parametrize("side", ["left", "right"])
def test_position_ids_from_mask(side):
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=np.int64)
    if side == "right":
        mask = mask[:, ::-1].copy()
    for query_len in (1, 3, 6):
        feeds = {"attention_mask": mask, "input_ids": np.zeros((3, query_len), dtype=np.int64)}

        def body(g, x):
            ids = ops.position_ids_from_mask(g, x["attention_mask"], x["input_ids"], name="pos")
            return {"position_ids": (ids, 2, INT64)}

        proto = build(
            body, feeds, {"attention_mask": ["batch", "total"], "input_ids": ["batch", "sequence"]}
        )
        expected = ref.position_ids(mask, query_len)
        for label, results in zip(("onnxruntime", "interpreter"), run_both(proto, feeds)):
            np.testing.assert_array_equal(results["position_ids"], expected, err_msg=label)
