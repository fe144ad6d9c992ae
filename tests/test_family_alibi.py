"""ALiBi families against Hugging Face (tiny random configs built here): Bloom, MPT, Falcon.

Each: a left-padded batch, prefill then 4 decode steps, every target at fp32 (≤ 1e-4), the
NumPy witness, precisions, and the ort lowering: ALiBi blocks keep opset-23 Attention (the
GroupQueryAttention kernel has no per-head position bias) and say so."""

import families
import numpy_forward
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

BLOOM = {
    "model_type": "bloom",
    "architectures": ["BloomForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 96,
    "n_layer": 2,
    "n_head": 6,  # not a power of two: the extra slopes are used
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_bloom_matches_transformers(tmp_path):
    assert numpy_forward.knows(BLOOM)
    exports = families.check_family(tmp_path, BLOOM)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "ALiBi" in decisions[0]["reasons"]["GroupQueryAttention"]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_bloom_refuses_post_layernorm_residual(tmp_path):
    from graphattn.models import architecture_for

    config = {**BLOOM, "apply_residual_connection_post_layernorm": True}
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        architecture_for(config).config_from_hf(config)
