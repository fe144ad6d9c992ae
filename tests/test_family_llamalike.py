"""Llama-like families against Hugging Face transformers: SmolLM3 (NoPE layers), Ministral
(sliding/full layers), Helium (interleaved RoPE), GLM (partial interleaved RoPE, fused
gate_up_proj), plus every RoPE scaling of the Llama family and Qwen2's max_window_layers.

Each config is tiny and random (hidden 64, vocab 96), with windows smaller than the prompt,
head_dim ≠ hidden/heads where the family allows it, and RoPE scalings whose original context
(8) the prompt plus decode steps cross. ``families.check_family`` compares every target at
fp32 with HF at every step (≤1e-4) and the NumPy witness on the prefill.
"""

from __future__ import annotations

import json

import families
import numpy_forward
import onnx
import pytest

from graphattn.models import architecture_for

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny(model_type: str, architecture: str, **changes) -> dict:
    return {"model_type": model_type, "architectures": [architecture], **TINY, **changes}


def gqa_attributes(export_dir) -> dict[str, dict]:
    """Per layer (``layers.3``), the attributes of its GroupQueryAttention node."""
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    found = {}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            found[node.name.split("/")[0]] = attrs
    return found


def saved_config(tmp_path) -> dict:
    return json.loads((tmp_path / "hf" / "config.json").read_text())


def mapped(config: dict):
    return architecture_for(config).config_from_hf(config)


# ---------------------------------------------------------------------------------- SmolLM3
SMOLLM3 = tiny(
    "smollm3",
    "SmolLM3ForCausalLM",
    num_hidden_layers=4,
    head_dim=32,  # != 64 / 4
    no_rope_layers=[1, 0, 1, 0],  # layers 1 and 3 are NoPE
    use_sliding_window=True,
    sliding_window=3,  # the config makes the NoPE layers slide
    attention_bias=True,
    mlp_bias=True,
    max_position_embeddings=64,
)


def test_smollm3_matches_hf(tmp_path):
    exports = families.check_family(tmp_path, SMOLLM3)
    saved = saved_config(tmp_path)
    assert numpy_forward.knows(saved)
    assert saved["layer_types"] == ["full_attention", "sliding_attention"] * 2
    cfg = mapped(saved)
    assert [layer.attention.rope is not None for layer in cfg.layers] == [True, False] * 2
    assert [layer.attention.window for layer in cfg.layers] == [None, 3, None, 3]
    assert cfg.tie_word_embeddings
    # every layer reaches the kernel: rotary inside it only on the RoPE layers
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 4
    gqa = gqa_attributes(exports["ort"])
    assert [gqa[f"layers.{i}"]["do_rotary"] for i in range(4)] == [1, 0, 1, 0]
    assert [gqa[f"layers.{i}"].get("local_window_size") for i in range(4)] == [None, 3, None, 3]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_smollm3_explicit_layer_types_and_fallback(tmp_path):
    """A sliding RoPE layer, a full NoPE layer, MQA, untied head; head_dim 24 keeps Attention."""
    config = tiny(
        "smollm3",
        "SmolLM3ForCausalLM",
        num_hidden_layers=3,
        num_key_value_heads=1,
        head_dim=24,
        no_rope_layers=[1, 0, 1],
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    exports = families.check_family(tmp_path, config)
    cfg = mapped(saved_config(tmp_path))
    assert [layer.attention.window for layer in cfg.layers] == [4, None, 4]
    assert [layer.attention.rope is not None for layer in cfg.layers] == [True, False, True]
    for decision in families.lowering(exports["ort"]):
        assert decision["kernel"] == "Attention"
        assert decision["reasons"]["GroupQueryAttention"] == "head_dim 24 is not a multiple of 16"


def test_smollm3_interval_rule():
    """Without no_rope_layers, every no_rope_layer_interval-th layer is NoPE (SmolLM3Config)."""
    config = tiny("smollm3", "SmolLM3ForCausalLM", num_hidden_layers=6, no_rope_layer_interval=3)
    ropes = [layer.attention.rope is not None for layer in mapped(config).layers]
    assert ropes == [True, True, False, True, True, False]
    config.update(use_sliding_window=True, sliding_window=5)
    windows = [layer.attention.window for layer in mapped(config).layers]
    assert windows == [None, None, 5, None, None, 5]
    assert mapped(config).layers[0].attention.rope.theta == 2_000_000.0  # SmolLM3's default


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
            "partial_rotary_factor=0.25 is not supported",
        ),
        (
            {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3},
            "use_sliding_window=None: which one holds is ambiguous",
        ),
        ({"no_rope_layers": [1, 2]}, "no_rope_layers must list 0/1 for each of 2 layers"),
        ({"no_rope_layers": [1]}, "no_rope_layers must list 0/1 for each of 2 layers"),
        ({"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
    ],
)
def test_smollm3_refuses(changes, message):
    config = tiny("smollm3", "SmolLM3ForCausalLM", num_hidden_layers=2, **changes)
    with pytest.raises(ValueError, match=message):
        mapped(config)


# -------------------------------------------------------------------------------- Ministral
MINISTRAL = tiny(
    "ministral",
    "MinistralForCausalLM",
    num_hidden_layers=3,
    num_key_value_heads=1,  # MQA
    head_dim=32,  # != 64 / 4
    sliding_window=3,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    max_position_embeddings=64,
    rope_theta=5000.0,
)


def test_ministral_matches_hf(tmp_path):
    exports = families.check_family(tmp_path, MINISTRAL)
    assert numpy_forward.knows(saved_config(tmp_path))
    cfg = mapped(saved_config(tmp_path))
    assert [layer.attention.window for layer in cfg.layers] == [3, None, 3]
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3
    gqa = gqa_attributes(exports["ort"])
    assert [gqa[f"layers.{i}"].get("local_window_size") for i in range(3)] == [3, None, 3]
    assert all(gqa[f"layers.{i}"]["kv_num_heads"] == 1 for i in range(3))
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_ministral_default_layer_types():
    """Without layer_types every layer slides when sliding_window is set, none when it is null."""
    config = tiny("ministral", "MinistralForCausalLM", num_hidden_layers=2, sliding_window=7)
    assert [layer.attention.window for layer in mapped(config).layers] == [7, 7]
    config["sliding_window"] = None
    assert [layer.attention.window for layer in mapped(config).layers] == [None, None]


def test_ministral_refuses_partial_rotary():
    config = tiny(
        "ministral", "MinistralForCausalLM", num_hidden_layers=2, partial_rotary_factor=0.5
    )
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        mapped(config)


# ----------------------------------------------------------------------------------- Helium
HELIUM = tiny(
    "helium",
    "HeliumForCausalLM",
    num_hidden_layers=2,
    head_dim=16,  # Helium's o_proj is hidden -> hidden: heads x head_dim = hidden
    attention_bias=True,
    mlp_bias=True,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
)


def test_helium_matches_hf(tmp_path):
    exports = families.check_family(tmp_path, HELIUM)
    saved = saved_config(tmp_path)
    assert numpy_forward.knows(saved)
    cfg = mapped(saved)
    assert all(layer.attention.rope.interleaved for layer in cfg.layers)
    assert cfg.layers[0].norms["attn_norm"].epsilon == 1e-5
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 2
    gqa = gqa_attributes(exports["ort"])
    assert all(gqa[f"layers.{i}"]["rotary_interleaved"] == 1 for i in range(2))
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_helium_defaults():
    """HeliumConfig's defaults when a file omits them: head_dim 128, eps 1e-8, base 1e5."""
    config = tiny(
        "helium", "HeliumForCausalLM", num_hidden_layers=1, hidden_size=256, num_attention_heads=2
    )
    layer = mapped(config).layers[0]
    assert layer.attention.head_dim == 128
    assert layer.norms["attn_norm"].epsilon == 1e-8
    assert layer.attention.rope.theta == 100_000.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"head_dim": 32}, "num_attention_heads=4 x head_dim=32 must equal hidden_size=64"),
        ({"head_dim": 16, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ],
)
def test_helium_refuses(changes, message):
    config = tiny("helium", "HeliumForCausalLM", num_hidden_layers=1, **changes)
    with pytest.raises(ValueError, match=message):
        mapped(config)


# -------------------------------------------------------------------------------------- GLM
GLM = tiny(
    "glm",
    "GlmForCausalLM",
    num_hidden_layers=2,
    head_dim=32,  # != 64 / 4; rotary width 16 (partial_rotary_factor 0.5 by default)
    attention_bias=True,
    max_position_embeddings=64,
    eos_token_id=[2, 3],
)


def test_glm_matches_hf(tmp_path):
    exports = families.check_family(tmp_path, GLM)
    saved = saved_config(tmp_path)
    assert numpy_forward.knows(saved)
    rope = mapped(saved).layers[0].attention.rope
    assert (rope.rotary_dim, rope.interleaved) == (16, True)
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 2
    gqa = gqa_attributes(exports["ort"])
    assert all(gqa[f"layers.{i}"]["rotary_interleaved"] == 1 for i in range(2))
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_glm_rotary_width_not_for_the_kernel(tmp_path):
    """head_dim 48, partial 0.5: 24 rotated channels, 12 cos/sin columns: Attention, with why."""
    config = {**GLM, "head_dim": 48, "num_key_value_heads": 1, "partial_rotary_factor": 0.5}
    exports = families.check_family(tmp_path, config)
    for decision in families.lowering(exports["ort"]):
        assert decision["kernel"] == "Attention"
        assert decision["reasons"]["GroupQueryAttention"] == (
            "the kernel needs a cos/sin width that is a multiple of 8, got 12"
        )


def test_glm_refuses_odd_rotary_width():
    config = tiny("glm", "GlmForCausalLM", num_hidden_layers=1, head_dim=16)
    config["partial_rotary_factor"] = 0.3  # int(16 * 0.3) = 4 is fine; 0.2 gives 3
    assert mapped(config).layers[0].attention.rope.rotary_dim == 4
    config["partial_rotary_factor"] = 0.2
    with pytest.raises(ValueError, match="partial_rotary_factor=0.2 gives an odd"):
        mapped(config)


# ------------------------------------------------------------------- Llama RoPE scalings
LLAMA = tiny(
    "llama",
    "LlamaForCausalLM",
    num_hidden_layers=2,
    head_dim=32,  # != 64 / 4, a multiple of 16 for the kernel
    max_position_embeddings=64,
)
# original context 8: the 9-token prompt and 4 decode steps cross it
STATIC_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 2.0,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "original_max_position_embeddings": 8,
    },
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 3.0,
        "attention_factor": 1.3,
        "truncate": False,
        "original_max_position_embeddings": 8,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


@pytest.mark.parametrize("name", sorted(STATIC_SCALINGS))
def test_llama_static_rope_scaling(tmp_path, name):
    config = {**LLAMA, "rope_parameters": {"rope_theta": 10000.0, **STATIC_SCALINGS[name]}}
    exports = families.check_family(tmp_path, config)
    saved = saved_config(tmp_path)
    assert saved["rope_parameters"]["rope_type"] == STATIC_SCALINGS[name]["rope_type"]
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 2


def test_llama_dynamic_rope_scaling(tmp_path):
    """Dynamic NTK, max_position_embeddings 10: the prefill (9) and step 1 (10) keep the base,
    steps 2-4 (11-13) raise it. HF updates its frequencies statefully; the graph recomputes
    them per call from max(position_ids) + 1: the same for non-decreasing lengths."""
    config = {
        **LLAMA,
        "max_position_embeddings": 10,
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    }
    exports = families.check_family(tmp_path, config)
    for decision in families.lowering(exports["ort"]):
        assert decision["kernel"] == "Attention"
        assert decision["reasons"]["GroupQueryAttention"] == (
            "dynamic RoPE changes its frequencies per call; the kernel's cos/sin cache is fixed"
        )


def test_llama_rope_scaling_old_spelling():
    """``rope_theta`` + ``rope_scaling`` (older files, "type") read as ``rope_parameters``."""
    old = {**LLAMA, "rope_theta": 500.0, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    old["rope_scaling"]["original_max_position_embeddings"] = 8
    new = {
        **LLAMA,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 500.0,
            "factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    }
    assert mapped(old).layers[0].attention.rope == mapped(new).layers[0].attention.rope


def test_qwen2_max_window_layers(tmp_path):
    """use_sliding_window with max_window_layers 1: layers 1 and 2 slide (window 4)."""
    config = tiny(
        "qwen2",
        "Qwen2ForCausalLM",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        max_position_embeddings=64,
    )
    exports = families.check_family(tmp_path, config)
    saved = saved_config(tmp_path)
    assert saved["layer_types"] == ["full_attention"] + ["sliding_attention"] * 2
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3
    gqa = gqa_attributes(exports["ort"])
    assert [gqa[f"layers.{i}"].get("local_window_size") for i in range(3)] == [None, 4, 4]
