"""Qwen3 against Hugging Face (tiny random configs built here): QK-norm per head before RoPE,
a sliding layer among full ones, head_dim ≠ hidden/heads; every target at fp32 (≤ 1e-4),
the NumPy witness, every precision, and which kernel each layer's block became."""

import families
import numpy_forward
import onnx
import pytest

from graphattn.models import architecture_for

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # ≠ 64 / 4
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": True,
    "sliding_window": 3,
    "max_window_layers": 1,
    "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_qwen3_matches_transformers_on_every_target(tmp_path):
    assert numpy_forward.knows(QWEN3)
    exports = families.check_family(tmp_path, QWEN3)
    # every block reaches GroupQueryAttention; the sliding layer's window reaches the kernel
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3
    graph = onnx.load(str(exports["ort"] / "model.onnx"), load_external_data=False).graph
    windows = [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("local_window_size")
        for n in graph.node
        if n.op_type == "GroupQueryAttention"
    ]
    assert windows == [None, 3, None]
    # QK-norm runs before the kernel, per head
    assert sum(n.op_type == "RMSNormalization" for n in graph.node) >= 6
    # functions: one semantic block per layer, naming what it computes
    functions = onnx.load(str(exports["functions"] / "model.onnx"), load_external_data=False)
    blocks = [n.op_type for n in functions.graph.node if n.op_type.startswith("SelfAttention")]
    assert blocks == ["SelfAttention_qk_rms_head_rope_halves"] * 3
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_qwen3_with_tied_head_and_mqa(tmp_path):
    config = {**QWEN3, "num_key_value_heads": 1, "tie_word_embeddings": True, "layer_types": None}
    config.pop("layer_types")
    config["use_sliding_window"] = False
    exports = families.check_family(tmp_path, config, targets=("functions", "ort"))
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3


def test_head_dim_the_kernel_cannot_take_falls_back_with_its_reason(tmp_path):
    config = {**QWEN3, "head_dim": 8}
    exports = families.check_family(tmp_path, config, targets=("ort",), numpy_check=False)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention"] * 3
    assert decisions[0]["reasons"] == {"GroupQueryAttention": "head_dim 8 is not a multiple of 16"}


def test_refused_keys_are_named():
    for key, value in (("pretraining_tp", 2), ("hidden_act", "tanh")):
        config = {**QWEN3, key: value}
        with pytest.raises(ValueError, match=key):
            architecture_for(config).config_from_hf(config)


def test_layer_types_of_the_wrong_length_are_refused():
    config = {**QWEN3, "layer_types": ["full_attention"]}
    with pytest.raises(ValueError, match="layer_types"):
        architecture_for(config).config_from_hf(config)


def test_dynamic_rope_on_some_layers_keeps_the_others_tables_long_enough(tmp_path):
    """Gemma 3 with dynamic NTK on its global layers (Attention: frequencies change per call)
    and default RoPE on its sliding layers (GroupQueryAttention with fixed cos/sin tables):
    generation runs past max_position_embeddings, where dynamic RoPE is meant to work, so the
    kernel's tables must reach as far (context × factor), and HF agrees at every step."""
    from test_family_gemma import GEMMA3_TEXT

    config = {
        **GEMMA3_TEXT,
        "max_position_embeddings": 10,  # prefill 9, then 4 steps: positions up to 12
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
    }
    exports = families.check_family(tmp_path, config, targets=("ort",), numpy_check=False)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["GroupQueryAttention", "Attention"] + [
        "GroupQueryAttention"
    ]
    model = onnx.load(str(exports["ort"] / "model.onnx"), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["graphattn.context_length"] == "20"
