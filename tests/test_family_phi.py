"""Phi-3, Phi-2, Granite, StableLM and Nemotron against Hugging Face (tiny random configs).

Each family: a left-padded batch (rows 9/5/7), prefill then 4 greedy decode steps, every
target at fp32 (≤ 1e-4 at every step), the NumPy witness on the prefill, precisions on one
config, the ort lowering (which layers became GroupQueryAttention and why the rest did not),
and a one-line refusal for each config value that is not implemented.

Phi-3's LongRoPE is checked where it switches: with ``original_max_position_embeddings`` 8 the
9-token prefill already uses the long factors; with 10 the switch falls on the second decode
step (the call whose max(position_ids) + 1 is 11), which HF's own rotary module confirms and
which exports switching one position early or late get wrong at exactly that step; with 64 it
never switches.
"""

import json
import shutil

import families
import numpy as np
import numpy_forward
import pytest

from graphattn import export
from graphattn.models import architecture_for

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

GQA, ATTENTION = "GroupQueryAttention", "Attention"
LONGROPE_REASON = "longrope RoPE changes its frequencies per call"


def config_of(config: dict):
    return architecture_for(config).config_from_hf(config)


def refused(config: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key) as error:
        config_of(config)
    assert "not supported" in str(error.value)


# ------------------------------------------------------------------------------ Phi-3
SHORT = [1.0, 1.3, 0.8, 1.7, 2.1, 1.1, 3.0, 1.9]  # rotary_dim 16 / 2 entries
LONG = [2.5, 4.0, 1.5, 6.0, 3.2, 8.0, 5.5, 12.0]


def phi3(original: int, **changes) -> dict:
    """Phi-3 with LongRoPE, GQA 4/2 heads of 16, a window of 4 on every layer."""
    config = {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "original_max_position_embeddings": original,
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": SHORT,
            "long_factor": LONG,
            "attention_factor": 1.25,
        },
        "sliding_window": 4,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(changes)
    return config


PHI3_PLAIN = {
    **phi3(4096),
    "num_hidden_layers": 3,
    "head_dim": 32,  # ≠ hidden / heads
    "partial_rotary_factor": 0.5,  # rotary_dim 16
    "rope_scaling": None,
    "sliding_window": 3,
    "tie_word_embeddings": True,
}


def test_phi3_longrope_crossing_in_prefill(tmp_path):
    config = phi3(8)
    assert numpy_forward.knows(config)
    assert _hf_switches(config) == [True] * 5  # 9 > 8 already in the prefill
    exports = families.check_family(tmp_path, config)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == [ATTENTION] * 2
    assert all(LONGROPE_REASON in d["reasons"][GQA] for d in decisions)


def _hf_switches(config: dict, steps: int = 4) -> list[bool]:
    """Per call (prefill, then each decode step): whether HF's rotary module used the long
    factors, read from its inv_freq buffer as each call ends."""
    model = families.hf_model(config)
    rotary = model.model.rotary_emb
    wavelengths = 10000.0 ** (np.arange(0, 16, 2) / 16)
    tables = {False: 1 / (np.array(SHORT) * wavelengths), True: 1 / (np.array(LONG) * wavelengths)}
    used = []

    def record(module, args, output):
        freq = module.inv_freq.double().numpy()
        (kind,) = [k for k, table in tables.items() if np.allclose(freq, table, rtol=1e-6)]
        used.append(kind)

    rotary.register_forward_hook(record)
    ids, mask = families.left_padded(families.PROMPTS)
    families.hf_steps(model, ids, mask, steps)
    return used


def _first_mismatch(reference, ours, mask) -> int | None:
    real = mask[:, :, None].astype(bool)
    calls = [np.where(real, ours[0], 0)] + ours[1:]
    expected = [np.where(real, reference[0], 0)] + reference[1:]
    for step, (a, b) in enumerate(zip(calls, expected)):
        if np.abs(a - b).max() > 1e-3:
            return step
    return None


def test_phi3_longrope_switch_in_decode_is_where_hf_switches(tmp_path):
    config = phi3(10)
    # HF: prefill max(position)+1 = 9, then 10, 11, 12, 13: long from the second step on
    assert _hf_switches(config) == [False, False, True, True, True]
    exports = families.check_family(tmp_path, config, targets=("portable", "ort"))
    ids, mask = families.left_padded(families.PROMPTS)
    _, fed = families.hf_steps(families.hf_model(config), ids, mask, 4)
    reference = families.our_steps(exports["portable"], ids, mask, fed)
    # an export switching one position late (11) or early (9) is wrong from that call on
    for original, first_wrong in ((11, 2), (9, 1)):
        shifted = tmp_path / f"hf-{original}"
        shutil.copytree(tmp_path / "hf", shifted)
        saved = json.loads((shifted / "config.json").read_text())
        saved["original_max_position_embeddings"] = original
        (shifted / "config.json").write_text(json.dumps(saved))
        export(shifted, tmp_path / f"out-{original}", target="portable", last_logits_only=False)
        ours = families.our_steps(tmp_path / f"out-{original}", ids, mask, fed)
        assert _first_mismatch(reference, ours, mask) == first_wrong


def test_phi3_longrope_below_original_context(tmp_path):
    config = phi3(64, max_position_embeddings=256)
    assert _hf_switches(config) == [False] * 5  # 13 <= 64 at the last step
    exports = families.check_family(tmp_path, config, targets=("portable", "ort"))
    assert families.kernels(exports["ort"]) == [ATTENTION] * 2


def test_phi3_partial_rotary_head_dim_window_tied(tmp_path):
    assert numpy_forward.knows(PHI3_PLAIN)
    exports = families.check_family(tmp_path, PHI3_PLAIN)
    assert families.kernels(exports["ort"]) == [GQA] * 3
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_phi3_reads_old_rope_names_and_defaults():
    saved = phi3(8)
    for old in ("su", "yarn"):
        legacy = {**saved, "rope_scaling": {**saved["rope_scaling"], "type": old}}
        del legacy["rope_scaling"]["rope_type"]
        assert config_of(legacy) == config_of(saved)
    # Phi3Config's top-level original_max_position_embeddings wins over the dict's, and
    # defaults to 4096
    inner = {
        **saved,
        "rope_scaling": {**saved["rope_scaling"], "original_max_position_embeddings": 32},
    }
    assert config_of(inner) == config_of(saved)
    absent = {k: v for k, v in saved.items() if k != "original_max_position_embeddings"}
    assert config_of(absent).layers[0].attention.rope.original_context == 4096


def test_phi3_refusals():
    refused(phi3(8, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type")
    for key in ("attention_bias", "mlp_bias", "lm_head_bias"):
        refused({**phi3(8), key: True}, key)


# ------------------------------------------------------------------------------ Phi-2
PHI = {
    "model_type": "phi",
    "architectures": ["PhiForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # ≠ hidden / heads
    "partial_rotary_factor": 0.5,  # rotary_dim 16
    "hidden_act": "gelu_new",
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PHI_QK = {
    **PHI,
    "head_dim": None,  # qk_layernorm's width is hidden / heads = 16
    "num_key_value_heads": 4,
    "partial_rotary_factor": 0.4,  # int(16 · 0.4) = 6 channels rotate
    "qk_layernorm": True,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "tie_word_embeddings": True,
}


def test_phi_parallel_shared_norm_partial_rotary(tmp_path):
    assert numpy_forward.knows(PHI)
    exports = families.check_family(tmp_path, PHI)
    layer = config_of(PHI).layers[0]
    assert set(layer.norms) == {"attn_norm"} and layer.residual == "parallel"
    assert families.kernels(exports["ort"]) == [GQA] * 2
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_phi_qk_layernorm_tied_linear_rope(tmp_path):
    config = {k: v for k, v in PHI_QK.items() if v is not None}
    exports = families.check_family(tmp_path, config, targets=("portable", "ort"))
    attention = config_of(config).layers[0].attention
    assert (attention.qk_norm.kind, attention.qk_norm_scope, attention.rope.rotary_dim) == (
        "layer",
        "head",
        6,
    )
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == [ATTENTION] * 2
    assert "multiple of 8, got 3" in decisions[0]["reasons"][GQA]


def test_phi_refusals_and_defaults():
    refused({**PHI, "qk_layernorm": True}, "qk_layernorm")
    default = {k: v for k, v in PHI.items() if k != "partial_rotary_factor"}
    assert config_of(default).layers[0].attention.rope.rotary_dim == 16  # PhiConfig's 0.5


# ------------------------------------------------------------------------------ Granite
GRANITE = {
    "model_type": "granite",
    "architectures": ["GraniteForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,  # MQA
    "head_dim": 32,  # ≠ hidden / heads
    "attention_bias": True,
    "mlp_bias": True,
    "embedding_multiplier": 3.0,
    "attention_multiplier": 0.07,
    "residual_multiplier": 0.5,
    "logits_scaling": 2.5,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 64,
    # YaRN with a small original context: a static frequency table, cos/sin times its factor
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_granite_multipliers_biases_mqa_yarn(tmp_path):
    assert numpy_forward.knows(GRANITE)
    exports = families.check_family(tmp_path, GRANITE)
    cfg = config_of(GRANITE)
    assert (cfg.embedding_scale, cfg.logit_scale) == (3.0, 1 / 2.5)
    assert (cfg.layers[0].attention.scale, cfg.layers[0].residual_scale) == (0.07, 0.5)
    assert families.kernels(exports["ort"]) == [GQA] * 2
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_granite_refusals():
    refused({**GRANITE, "attention_multiplier": 0.0}, "attention_multiplier")
    refused({**GRANITE, "logits_scaling": -1.0}, "logits_scaling")


# ------------------------------------------------------------------------------ StableLM
STABLELM = {
    "model_type": "stablelm",
    "architectures": ["StableLmForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 128,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 64
    "num_key_value_heads": 1,
    "partial_rotary_factor": 0.25,  # rotary_dim 16
    "use_qkv_bias": True,
    "use_parallel_residual": True,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
STABLELM_SEQUENTIAL = {
    **STABLELM,
    "hidden_size": 64,
    "num_attention_heads": 4,  # head_dim 16, rotary_dim 4
    "num_key_value_heads": 2,
    "use_qkv_bias": False,
    "use_parallel_residual": False,
    "layer_norm_eps": 1e-4,
    "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 8,  # dynamic NTK grows the base once a call passes 8
}


def test_stablelm_parallel_qkv_bias_mqa(tmp_path):
    assert numpy_forward.knows(STABLELM)
    exports = families.check_family(tmp_path, STABLELM)
    layer = config_of(STABLELM).layers[0]
    assert set(layer.norms) == {"attn_norm"} and layer.residual == "parallel"
    assert families.kernels(exports["ort"]) == [GQA] * 2
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_stablelm_sequential_dynamic_rope(tmp_path):
    exports = families.check_family(tmp_path, STABLELM_SEQUENTIAL, targets=("portable", "ort"))
    assert set(config_of(STABLELM_SEQUENTIAL).layers[0].norms) == {"attn_norm", "mlp_norm"}
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == [ATTENTION] * 2
    assert "dynamic RoPE changes its frequencies per call" in decisions[0]["reasons"][GQA]


def test_stablelm_refusals_and_defaults():
    refused({**STABLELM, "qk_layernorm": True}, "qk_layernorm")
    default = {k: v for k, v in STABLELM.items() if k != "partial_rotary_factor"}
    assert config_of(default).layers[0].attention.rope.rotary_dim == 16  # StableLmConfig's 0.25
    # StableLmAttention's head_dim is always hidden / heads, whatever the file says
    assert config_of({**STABLELM, "head_dim": 32}).head_dim == 64


# ------------------------------------------------------------------------------ Nemotron
NEMOTRON = {
    "model_type": "nemotron",
    "architectures": ["NemotronForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # ≠ hidden / heads
    "partial_rotary_factor": 0.5,  # rotary_dim 16
    "hidden_act": "relu2",
    "attention_bias": True,
    "mlp_bias": True,
    "norm_eps": 1e-5,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_nemotron_layernorm1p_relu2_partial_rotary(tmp_path):
    assert numpy_forward.knows(NEMOTRON)
    exports = families.check_family(tmp_path, NEMOTRON)
    cfg = config_of(NEMOTRON)
    assert (cfg.layers[0].mlp.kind, cfg.layers[0].mlp.activation) == ("plain", "relu2")
    assert families.kernels(exports["ort"]) == [GQA] * 3
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_nemotron_refusals_and_defaults():
    refused({**NEMOTRON, "hidden_act": "prelu"}, "hidden_act")
    default = {k: v for k, v in NEMOTRON.items() if k != "partial_rotary_factor"}
    assert config_of(default).layers[0].attention.rope.rotary_dim == 16  # NemotronConfig's 0.5
