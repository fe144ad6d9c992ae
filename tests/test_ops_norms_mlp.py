"""Norms (RMSNorm, LayerNorm, QK-norm) and MLPs (GELU-tanh, SwiGLU) against NumPy, fp32 <= 1e-5."""

import numpy as np
import numpy_reference as ref
import pytest
from harness import assert_close, build, run_both

from graphattn import ops

SHAPES = [(1, 1, 64), (3, 4, 40), (3, 1, 576)]


def run_checked(body, feeds, expected, rank, atol=1e-5):
    proto = build(lambda g, x: {"y": (body(g, x), rank)}, feeds)
    for label, results in zip(("onnxruntime", "interpreter"), run_both(proto, feeds)):
        assert_close(results["y"], expected, atol, label)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape):
    rng = np.random.default_rng(1)
    feeds = {
        "x": rng.standard_normal(shape, dtype=np.float32) * 3,
        "w": rng.standard_normal(shape[-1:], dtype=np.float32),
    }
    expected = ref.rms_norm(feeds["x"], feeds["w"], 1e-5)
    run_checked(
        lambda g, x: ops.rms_norm(g, x["x"], x["w"], epsilon=1e-5, name="norm"), feeds, expected, 3
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape):
    rng = np.random.default_rng(2)
    feeds = {
        "x": rng.standard_normal(shape, dtype=np.float32) + 2,
        "w": rng.standard_normal(shape[-1:], dtype=np.float32),
        "b": rng.standard_normal(shape[-1:], dtype=np.float32),
    }
    expected = ref.layer_norm(feeds["x"], feeds["w"], feeds["b"], 1e-5)
    run_checked(
        lambda g, x: ops.layer_norm(g, x["x"], x["w"], x["b"], epsilon=1e-5, name="norm"),
        feeds,
        expected,
        3,
    )


@pytest.mark.parametrize("head_dim", [64, 40])
def test_qk_norm(head_dim):
    rng = np.random.default_rng(3)
    feeds = {
        "q": rng.standard_normal((3, 8, 4, head_dim), dtype=np.float32),
        "w": rng.standard_normal((head_dim,), dtype=np.float32),
    }
    expected = ref.rms_norm(feeds["q"], feeds["w"], 1e-6)
    run_checked(
        lambda g, x: ops.qk_norm(g, x["q"], x["w"], epsilon=1e-6, name="q_norm"), feeds, expected, 4
    )


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gelu_mlp(shape):
    rng = np.random.default_rng(4)
    width = shape[-1]
    weights = {
        "fc_weight": (width, 4 * width),
        "fc_bias": (4 * width,),
        "proj_weight": (4 * width, width),
        "proj_bias": (width,),
    }
    feeds = {"x": rng.standard_normal(shape, dtype=np.float32)}
    feeds |= {k: rng.standard_normal(s, dtype=np.float32) * 0.2 for k, s in weights.items()}
    expected = ref.gelu_mlp(*(feeds[k] for k in ("x", *weights)))
    run_checked(lambda g, x: ops.gelu_mlp(g, x["x"], x, name="mlp"), feeds, expected, 3, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_swiglu_mlp(shape):
    rng = np.random.default_rng(5)
    width, hidden = shape[-1], 3 * shape[-1]
    weights = {
        "gate_weight": (width, hidden),
        "up_weight": (width, hidden),
        "down_weight": (hidden, width),
    }
    feeds = {"x": rng.standard_normal(shape, dtype=np.float32)}
    feeds |= {k: rng.standard_normal(s, dtype=np.float32) * 0.2 for k, s in weights.items()}
    expected = ref.swiglu_mlp(*(feeds[k] for k in ("x", *weights)))
    run_checked(
        lambda g, x: ops.swiglu_mlp(g, x["x"], x, name="mlp"), feeds, expected, 3, atol=1e-5
    )
