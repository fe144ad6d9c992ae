"""Bad parameters raise ValueError naming the parameter when the graph is built."""

import onnx_ir as ir
import pytest

from graphattn import ops
from graphattn.ops import GraphEmitter

F = ir.DataType.FLOAT


def attention_inputs(heads=8, kv_heads=2, head_dim=64, query_rank=4):
    g = GraphEmitter()
    query = g.input("q", F, ["batch", heads, "seq", head_dim][:query_rank])
    key = g.input("k", F, ["batch", kv_heads, "seq", head_dim])
    value = g.input("v", F, ["batch", kv_heads, "seq", head_dim])
    return g, query, key, value


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_heads": 8, "kv_heads": 3, "head_dim": 64}, "kv_heads=3 must divide num_heads=8"),
        ({"num_heads": 8, "kv_heads": 0, "head_dim": 64}, "kv_heads"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 0}, "head_dim"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 64, "causal": True, "window": 0}, "window"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 64, "causal": True, "window": 2.5}, "window"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 64, "window": 4}, "window"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 64, "softcap": 0.0}, "softcap"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 64, "ssmax_s": -1.0}, "ssmax_s"),
        ({"num_heads": 8, "kv_heads": 2, "head_dim": 64, "scale": -0.1}, "scale"),
    ],
)
def test_attention_rejects_bad_parameters(kwargs, match):
    g, query, key, value = attention_inputs()
    with pytest.raises(ValueError, match=match):
        ops.scaled_dot_product_attention(g, query, key, value, **kwargs)


def test_attention_rejects_wrong_rank():
    g, query, key, value = attention_inputs(query_rank=3)
    with pytest.raises(ValueError, match="query must have rank 4"):
        ops.grouped_query_attention(g, query, key, value, num_heads=8, kv_heads=2, head_dim=64)


def test_attention_rejects_past_key_without_past_value():
    g, query, key, value = attention_inputs()
    with pytest.raises(ValueError, match="past_key and past_value"):
        ops.grouped_query_attention(
            g, query, key, value, num_heads=8, kv_heads=2, head_dim=64, past_key_BKPD=key
        )


def test_multi_head_and_multi_query_check_their_kv_heads():
    g, query, key, value = attention_inputs()
    with pytest.raises(ValueError, match="kv_heads == num_heads"):
        ops.multi_head_attention(g, query, key, value, num_heads=8, kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="kv_heads == 1"):
        ops.multi_query_attention(g, query, key, value, num_heads=8, kv_heads=2, head_dim=64)


@pytest.mark.parametrize(
    "head_dim,rotary_dim,match",
    [
        (63, None, "head_dim must be even"),
        (64, 33, "rotary_dim must be even"),
        (64, 96, "rotary_dim"),
    ],
)
def test_rotary_rejects_odd_or_oversized_dims(head_dim, rotary_dim, match):
    g = GraphEmitter()
    x = g.input("x", F, ["batch", 8, "seq", head_dim])
    with pytest.raises(ValueError, match=match):
        ops.apply_rotary(g, x, x, x, head_dim=head_dim, rotary_dim=rotary_dim, name="rot")


@pytest.mark.parametrize(
    "rotary_dim,theta,scaling,match",
    [
        (33, 10000.0, None, "rotary_dim must be even"),
        (32, 0.0, None, "theta"),
        (32, 10000.0, {"type": "yarn", "factor": 2.0}, "'yarn' is not supported"),
        (32, 10000.0, {"type": "llama3", "factor": 8.0}, "low_freq_factor"),
        (32, 10000.0, {"type": "linear", "factor": 0}, "factor must be positive"),
    ],
)
def test_inverse_frequencies_reject_bad_parameters(rotary_dim, theta, scaling, match):
    with pytest.raises(ValueError, match=match):
        ops.inverse_frequencies(rotary_dim, theta, scaling)


def test_masks_and_norms_reject_bad_parameters():
    g = GraphEmitter()
    mask = g.input("attention_mask", ir.DataType.INT64, ["batch", "total", 1])
    ids = g.input("input_ids", ir.DataType.INT64, ["batch", "seq"])
    with pytest.raises(ValueError, match="attention_mask must have rank 2"):
        ops.attention_bias(g, mask, ids)
    x = g.input("x", F, ["batch", "seq", 64])
    with pytest.raises(ValueError, match="epsilon"):
        ops.rms_norm(g, x, x, epsilon=0.0, name="norm")
    with pytest.raises(ValueError, match="MLP weights missing: up_weight"):
        ops.swiglu_mlp(g, x, {"gate_weight": x, "down_weight": x}, name="mlp")


def test_value_names_are_unique():
    g = GraphEmitter()
    g.input("x", F, [1])
    with pytest.raises(ValueError, match="'x' is used twice"):
        g.input("x", F, [1])
