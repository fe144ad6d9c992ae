"""OLMo, OLMo 2, Cohere, StarCoder2 and EXAONE 4 against Hugging Face (tiny random configs).

Each: a left-padded batch (lengths 9/5/7), prefill then 4 decode steps, every target at fp32
(≤ 1e-4), the NumPy witness, precisions, the ort lowering per layer, and the config values
each family refuses."""

import json

import families
import numpy as np
import numpy_forward
import onnx
import pytest

from graphattn.models import architecture_for

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

GQA = "GroupQueryAttention"
SMALL = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

OLMO = {
    **SMALL,
    "model_type": "olmo",
    "architectures": ["OlmoForCausalLM"],
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # ≠ hidden / heads
    "clip_qkv": 0.5,  # small: most q/k/v entries of the random model are clamped
    "attention_bias": True,
    "tie_word_embeddings": False,
}
OLMO2 = {
    **SMALL,
    "model_type": "olmo2",
    "architectures": ["Olmo2ForCausalLM"],
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,  # MQA: k_norm is [head_dim]-wide here, q_norm [4 · head_dim]
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    # YaRN past an original context of 8 (max_position_embeddings 64: factor 8)
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8,
    },
}
# LongRoPE switching from the short to the long factors during the decode steps (10 < 9 + 4)
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 10,
    "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
}
COHERE = {
    **SMALL,
    "model_type": "cohere",
    "architectures": ["CohereForCausalLM"],
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "attention_bias": True,
    "logit_scale": 0.25,
    "layer_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
}
STARCODER2 = {
    **SMALL,
    "model_type": "starcoder2",
    "architectures": ["Starcoder2ForCausalLM"],
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "sliding_window": 3,  # smaller than the prompt
    "use_bias": True,
    "norm_epsilon": 1e-5,
    "hidden_act": "gelu_pytorch_tanh",
}
EXAONE4 = {
    **SMALL,
    "model_type": "exaone4",
    "architectures": ["Exaone4ForCausalLM"],
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "sliding_window": 3,
    # local (RoPE, window), global (NoPE, full), local
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}
ALL = (OLMO, OLMO2, COHERE, STARCODER2, EXAONE4)


def ort_nodes(export_dir, op_type):
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == op_type]


def attribute(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def saved_config(tmp_path):
    return json.loads((tmp_path / "hf" / "config.json").read_text())


def test_numpy_witness_knows_every_family():
    for config in ALL:
        assert numpy_forward.knows(config), config["model_type"]


# ----------------------------------------------------------------------------------- OLMo
def test_olmo_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, OLMO)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == [GQA, GQA]
    assert all(not d["reasons"] for d in decisions)
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_olmo_config_and_clip():
    cfg = architecture_for(OLMO).config_from_hf(OLMO)
    assert cfg.layers[0].attention.clip_qkv == 0.5 and cfg.head_dim == 32
    assert all(s.kind == "layer" and s.epsilon == 1e-5 for s in cfg.layers[0].norms.values())
    plan = architecture_for(OLMO).weights(cfg)
    assert not any("norm" in role for role in plan)  # non-parametric LayerNorms: no roles
    assert {"layers.0.q.bias", "layers.0.o.bias"} <= set(plan)  # attention_bias
    # the clip bites: most of layer 0's q/k/v of the random test model exceed ±clip_qkv
    weights = {k: v.double().numpy() for k, v in families.hf_model(OLMO).state_dict().items()}
    assert not any("norm" in name for name in weights)
    x = weights["model.embed_tokens.weight"][np.array(families.PROMPTS[0])]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    for part in "qkv":
        p = f"model.layers.0.self_attn.{part}_proj"
        y = x @ weights[f"{p}.weight"].T + weights[f"{p}.bias"]
        assert (np.abs(y) > OLMO["clip_qkv"]).mean() > 0.3, part


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"clip_qkv": 0}, "clip_qkv"), ({"partial_rotary_factor": 0.5}, "partial_rotary_factor")],
)
def test_olmo_refuses(changes, key):
    config = {**OLMO, **changes}
    with pytest.raises(ValueError, match=f"config.json {key}="):
        architecture_for(config).config_from_hf(config)


# --------------------------------------------------------------------------------- OLMo 2
def test_olmo2_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, OLMO2)
    cfg = architecture_for(OLMO2).config_from_hf(saved_config(tmp_path))
    attention = cfg.layers[0].attention
    assert (attention.qk_norm.kind, attention.qk_norm_scope) == ("rms", "full")
    assert set(cfg.layers[0].norms) == {"post_attn_norm", "post_mlp_norm"}
    plan = architecture_for(OLMO2).weights(cfg)
    assert plan["layers.0.q_norm.weight"].shape == (4 * 16,)
    assert plan["layers.0.k_norm.weight"].shape == (1 * 16,)
    assert families.kernels(exports["ort"]) == [GQA, GQA]
    # the full-width QK-norm stays in front of the kernel (q and k of both layers)
    assert len(ort_nodes(exports["ort"], "RMSNormalization")) >= 4
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_olmo2_longrope_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, {**OLMO2, "rope_parameters": LONGROPE})
    # LongRoPE picks its factors per call, which the kernel's fixed cos/sin cache cannot
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "longrope" in decisions[0]["reasons"][GQA]


# --------------------------------------------------------------------------------- Cohere
def test_cohere_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, COHERE)
    cfg = architecture_for(COHERE).config_from_hf(saved_config(tmp_path))
    layer = cfg.layers[0]
    assert layer.residual == "parallel" and set(layer.norms) == {"attn_norm"}
    assert layer.attention.rope.interleaved and cfg.logit_scale == 0.25
    assert cfg.tie_word_embeddings
    assert families.kernels(exports["ort"]) == [GQA, GQA]
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "rotary_interleaved") for n in nodes] == [1, 1]


def test_cohere_precisions(tmp_path):
    families.hf_model(COHERE).save_pretrained(tmp_path / "hf", safe_serialization=True)
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_cohere_default_theta():
    config = {k: v for k, v in COHERE.items() if k != "rope_parameters"}
    cfg = architecture_for(config).config_from_hf(config)
    assert cfg.layers[0].attention.rope.theta == 500000.0


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"use_qk_norm": True}, "use_qk_norm"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_cohere_refuses(changes, key):
    config = {**COHERE, **changes}
    with pytest.raises(ValueError, match=f"config.json {key}="):
        architecture_for(config).config_from_hf(config)


# ----------------------------------------------------------------------------- StarCoder2
def test_starcoder2_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, STARCODER2)
    cfg = architecture_for(STARCODER2).config_from_hf(saved_config(tmp_path))
    assert [layer.attention.window for layer in cfg.layers] == [3, 3]
    assert families.kernels(exports["ort"]) == [GQA, GQA]
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "local_window_size") for n in nodes] == [3, 3]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_starcoder2_without_bias_or_window(tmp_path):
    config = {**STARCODER2, "use_bias": False, "sliding_window": None, "num_key_value_heads": 1}
    exports = families.check_family(tmp_path, config, targets=("ort",))
    cfg = architecture_for(config).config_from_hf(saved_config(tmp_path))
    plan = architecture_for(config).weights(cfg)
    biases = {r for r in plan if r.endswith("bias") or r.endswith("_bias")}
    assert biases == {
        "final_norm.bias",
        *(f"layers.{i}.{p}_norm.bias" for i in (0, 1) for p in ("attn", "mlp")),
    }
    assert families.kernels(exports["ort"]) == [GQA, GQA]


def test_starcoder2_refuses():
    config = {**STARCODER2, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="config.json partial_rotary_factor="):
        architecture_for(config).config_from_hf(config)


# ------------------------------------------------------------------------------- EXAONE 4
def test_exaone4_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, EXAONE4)
    cfg = architecture_for(EXAONE4).config_from_hf(saved_config(tmp_path))
    # sliding layers rotate, the global one is NoPE
    assert [layer.attention.rope is not None for layer in cfg.layers] == [True, False, True]
    assert [layer.attention.window for layer in cfg.layers] == [3, None, 3]
    assert families.kernels(exports["ort"]) == [GQA, GQA, GQA]
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "do_rotary") for n in nodes] == [1, 0, 1]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_exaone4_layer_types_from_pattern():
    config = {k: v for k, v in EXAONE4.items() if k != "layer_types"}
    config = {**config, "num_hidden_layers": 5, "sliding_window_pattern": 2}
    cfg = architecture_for(config).config_from_hf(config)
    assert [layer.attention.window for layer in cfg.layers] == [3, None, 3, None, 3]
    assert [layer.attention.rope is None for layer in cfg.layers] == [
        False,
        True,
        False,
        True,
        False,
    ]
    # without a sliding_window every layer is global and rotates
    config = {**EXAONE4, "sliding_window": None, "layer_types": ["full_attention"] * 3}
    cfg = architecture_for(config).config_from_hf(config)
    assert all(layer.attention.rope is not None for layer in cfg.layers)
    assert all(layer.attention.window is None for layer in cfg.layers)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"layer_types": None, "sliding_window_pattern": "LLLG"}, "sliding_window_pattern"),
        ({"sliding_window": None}, "sliding_window"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_exaone4_refuses(changes, key):
    config = {**EXAONE4, **changes}
    with pytest.raises(ValueError, match=f"config.json {key}="):
        architecture_for(config).config_from_hf(config)
