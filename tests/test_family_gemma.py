"""Gemma families against Hugging Face (tiny random configs built here): Gemma, Gemma 2,
Gemma 3 text (Gemma3ForCausalLM) and the text decoder of Gemma3ForConditionalGeneration.

Each: a left-padded batch (rows of 9/5/7 tokens), prefill then 4 decode steps, every target
at fp32 (≤ 1e-4), the NumPy witness, precisions, the ort lowering (which layers became
GroupQueryAttention, why the others did not), and the refused config keys."""

import json

import families
import numpy as np
import numpy_forward
import onnx
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

GEMMA = {
    "model_type": "gemma",
    "architectures": ["GemmaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 48,  # sqrt(48) is not a float32: the embedding factor is rounded as in HF
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,  # MQA
    "head_dim": 32,  # != hidden / heads
    "attention_bias": True,
    "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 64,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 8,  # prompt + decode steps cross it
    },
    "tie_word_embeddings": True,
}

GEMMA2 = {
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # != hidden / heads (16)
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 20,  # scale 20 ** -0.5, not head_dim ** -0.5
    "attn_logit_softcapping": 1.5,  # small: the cap bends the scores
    "final_logit_softcapping": 2.5,
    "sliding_window": 3,  # smaller than the prompt
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "max_position_embeddings": 64,
    "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    "tie_word_embeddings": False,
}

GEMMA3_TEXT = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 48,  # != hidden / heads; a multiple of 16
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 24,
    "final_logit_softcapping": 4.0,  # Gemma3ForCausalLM caps its logits
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "max_position_embeddings": 64,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
    },
    "attention_bias": True,
}

VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}


def longrope(half: int) -> dict:
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 8,  # prompt + decode steps cross it
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [2.0 + 0.5 * i for i in range(half)],
    }


GEMMA3 = {
    "model_type": "gemma3",
    "architectures": ["Gemma3ForConditionalGeneration"],
    "text_config": {
        **{k: v for k, v in GEMMA3_TEXT.items() if k not in ("architectures", "attention_bias")},
        "head_dim": 32,
        "final_logit_softcapping": None,
        "sliding_window": 3,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 8,  # prompt + decode steps cross it
            },
        },
    },
    "vision_config": VISION,
    "mm_tokens_per_image": 4,
    "boi_token_index": 93,
    "eoi_token_index": 94,
    "image_token_index": 95,
    "tie_word_embeddings": False,  # the head is language_model.lm_head.weight
}


def config_of(config: dict):
    from graphattn.models import architecture_for

    return architecture_for(config).config_from_hf(config)


def transformers_config(config: dict):
    import transformers

    return transformers.AutoConfig.for_model(**config)


def gqa_nodes(export_dir):
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]


# ------------------------------------------------------------------------------- Gemma
def test_gemma_matches_transformers(tmp_path):
    assert numpy_forward.knows(GEMMA)
    exports = families.check_family(tmp_path, GEMMA)
    # head_dim 32 and static (yarn) frequencies: every layer is the kernel
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 2
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_gemma_mapping():
    cfg = config_of(GEMMA)
    assert cfg.embedding_scale == pytest.approx(48**0.5)
    assert cfg.tie_word_embeddings and cfg.final_softcap is None
    layer = cfg.layers[0]
    assert (layer.attention.kv_heads, layer.attention.head_dim) == (1, 32)
    assert layer.attention.window is None and layer.attention.scale is None
    assert set(layer.norms) == {"attn_norm", "mlp_norm"}
    # transformers' GemmaConfig reads a legacy "gelu" as the tanh approximation
    assert config_of({**GEMMA, "hidden_act": "gelu"}).layers[0].mlp.activation == "gelu_tanh"
    # Gemma (1) has no sliding layers, whatever a file says
    sliding = {**GEMMA, "sliding_window": 2, "layer_types": ["sliding_attention"] * 2}
    assert all(layer.attention.window is None for layer in config_of(sliding).layers)


def test_gemma_structure_explains_head_dim(tmp_path):
    """head_dim 24 (not a multiple of 16): no layer becomes GroupQueryAttention, each says why."""
    from graphattn import export

    config = {**GEMMA, "head_dim": 24, "rope_parameters": {"rope_type": "default"}}
    model = families.hf_model(config)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    export(tmp_path / "hf", tmp_path / "ort", target="ort", last_logits_only=False)
    decisions = families.lowering(tmp_path / "ort")
    assert [d["kernel"] for d in decisions] == ["Attention"] * 2
    for d in decisions:
        assert d["reasons"]["GroupQueryAttention"] == "head_dim 24 is not a multiple of 16"


# ----------------------------------------------------------------------------- Gemma 2
def test_gemma2_matches_transformers(tmp_path):
    assert numpy_forward.knows(GEMMA2)
    exports = families.check_family(tmp_path, GEMMA2)
    # softcap and the sliding window are the kernel's own attributes
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3
    nodes = gqa_nodes(exports["ort"])
    assert [n.get("local_window_size", -1) for n in nodes] == [3, -1, 3]
    assert all(n["softcap"] == pytest.approx(1.5) for n in nodes)
    assert all(n["scale"] == pytest.approx(20**-0.5) for n in nodes)
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_gemma2_default_layer_types_and_softcaps():
    """Without layer_types, transformers slides the even layers; absent softcaps default to
    50 / 30, and an explicit null means none."""
    config = {k: v for k, v in GEMMA2.items() if k not in ("layer_types",)}
    config = {**config, "num_hidden_layers": 4}
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
        config.pop(key)
    cfg = config_of(config)
    assert [layer.attention.window for layer in cfg.layers] == [3, None, 3, None]
    hf = transformers_config(config)
    assert hf.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (hf.attn_logit_softcapping, hf.final_logit_softcapping) == (50.0, 30.0)
    assert {layer.attention.softcap for layer in cfg.layers} == {50.0}
    assert cfg.final_softcap == 30.0
    assert cfg.layers[0].attention.scale == pytest.approx(256**-0.5)
    nulls = config_of({**config, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert nulls.final_softcap is None and nulls.layers[0].attention.softcap is None
    assert set(cfg.layers[0].norms) == {"attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"}


# ------------------------------------------------------------------------ Gemma 3 text
def test_gemma3_text_matches_transformers(tmp_path):
    assert numpy_forward.knows(GEMMA3_TEXT)
    exports = families.check_family(tmp_path, GEMMA3_TEXT)
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3
    nodes = gqa_nodes(exports["ort"])
    assert [n.get("local_window_size", -1) for n in nodes] == [4, -1, 4]
    assert all("softcap" not in n for n in nodes)
    # one cos/sin cache per layer type (local base 100, global linear-scaled base 1e4)
    model = onnx.load(str(exports["ort"] / "model.onnx"), load_external_data=False)
    caches = {n.input[7] for n in model.graph.node if n.op_type == "GroupQueryAttention"}
    assert len(caches) == 2
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_gemma3_text_mapping_legacy_rope_keys():
    """Older files: rope_theta (global), rope_local_base_freq (local), rope_scaling (global
    only), sliding_window_pattern instead of layer_types."""
    config = {k: v for k, v in GEMMA3_TEXT.items() if k not in ("rope_parameters", "layer_types")}
    config = {
        **config,
        "num_hidden_layers": 7,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 3,
    }
    cfg = config_of(config)
    windows = [layer.attention.window for layer in cfg.layers]
    assert windows == [4, 4, None, 4, 4, None, 4]
    hf = transformers_config(config)  # transformers reads the same file the same way
    assert [w is None for w in windows] == [t == "full_attention" for t in hf.layer_types]
    for layer, kind in zip(cfg.layers, hf.layer_types):
        entry = dict(hf.rope_parameters[kind])
        assert layer.attention.rope.theta == entry.pop("rope_theta")
        assert (layer.attention.rope.scaling or {"rope_type": "default"}) == entry
    local, full = cfg.layers[0].attention.rope, cfg.layers[2].attention.rope
    assert (local.theta, local.scaling) == (10_000.0, None)
    assert full.theta == 1_000_000.0
    assert full.scaling == {"rope_type": "linear", "factor": 8.0}
    assert cfg.layers[0].attention.qk_norm is not None
    # defaults: pattern 6, bases 1e6 / 1e4
    bare = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_local_base_freq")}
    bare.pop("sliding_window_pattern")
    cfg = config_of(bare)
    assert [layer.attention.window is None for layer in cfg.layers] == [False] * 5 + [True, False]
    assert cfg.layers[0].attention.rope.theta == 10_000.0
    assert cfg.layers[5].attention.rope.theta == 1_000_000.0


# ---------------------------------------------- Gemma 3 (Gemma3ForConditionalGeneration)
def test_gemma3_conditional_matches_transformers(tmp_path):
    """The text decoder of the multimodal checkpoint: language_model.* weights, vision tower
    and projector present in the file and ignored; yarn on the global layers only."""
    assert numpy_forward.knows(GEMMA3)
    exports = families.check_family(tmp_path, GEMMA3)
    names = set(families.hf_weights(tmp_path / "hf"))
    assert "language_model.lm_head.weight" in names
    assert any(n.startswith("vision_tower.encoder.layers.1.") for n in names)
    assert "multi_modal_projector.mm_input_projection_weight" in names
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3
    nodes = gqa_nodes(exports["ort"])
    assert [n.get("local_window_size", -1) for n in nodes] == [3, 3, -1]
    genai = json.loads((exports["ort"] / "genai_config.json").read_text())
    assert genai["model"]["type"] == "gemma3_text"
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_gemma3_longrope_global_layers_keep_attention(tmp_path):
    """longrope on the global layers only: the sliding layers become GroupQueryAttention, the
    global ones keep Attention and say why (the kernel's cos/sin cache is fixed)."""
    text = dict(GEMMA3["text_config"])
    text["rope_parameters"] = {**text["rope_parameters"], "full_attention": longrope(16)}
    exports = families.check_family(tmp_path, {**GEMMA3, "text_config": text})
    decisions = families.lowering(exports["ort"])
    kinds = [d["kernel"] for d in decisions]
    assert kinds == ["GroupQueryAttention", "GroupQueryAttention", "Attention"]
    assert "longrope" in decisions[2]["reasons"]["GroupQueryAttention"]


def test_gemma3_conditional_reads_the_hub_vision_names():
    """Hub files name the tower vision_tower.vision_model.*: those are left out by prefix too,
    at any depth of the tower; no text-decoder tensor is."""
    from graphattn.models import gemma3

    prefixes = gemma3.CONDITIONAL_ARCHITECTURE.ignored_prefixes
    for name in (
        "vision_tower.vision_model.encoder.layers.126.mlp.fc2.bias",
        "vision_tower.vision_model.post_layernorm.weight",
        "vision_tower.encoder.layers.0.self_attn.out_proj.weight",
        "multi_modal_projector.mm_soft_emb_norm.weight",
    ):
        assert name.startswith(prefixes)
    assert not "language_model.model.layers.0.mlp.up_proj.weight".startswith(prefixes)


def test_gemma3_conditional_takes_top_level_ids_and_tie():
    config = {**GEMMA3, "eos_token_id": [1, 106], "tie_word_embeddings": True}
    cfg = config_of(config)
    assert cfg.eos_token_id == [1, 106] and cfg.tie_word_embeddings
    assert cfg.model_type == "gemma3" and cfg.final_softcap is None
    # Gemma3Config ties by default, whatever text_config says
    text = {**GEMMA3["text_config"], "tie_word_embeddings": False}
    untold = {k: v for k, v in GEMMA3.items() if k != "tie_word_embeddings"}
    assert config_of({**untold, "text_config": text}).tie_word_embeddings
    assert transformers_config({**untold, "text_config": text}).tie_word_embeddings


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({**GEMMA, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({**GEMMA2, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({**GEMMA3_TEXT, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({**GEMMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        (
            {**GEMMA2, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({**GEMMA3_TEXT, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        (
            {
                **GEMMA3_TEXT,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "partial_rotary_factor": 0.5},
                    "full_attention": {"rope_type": "default"},
                },
            },
            "partial_rotary_factor",
        ),
        (  # a legacy "type" key: transformers 5.24 would read default RoPE, not linear
            {
                **GEMMA3_TEXT,
                "rope_parameters": None,
                "rope_scaling": {"type": "linear", "factor": 8},
            },
            "rope_scaling",
        ),
        (
            {**GEMMA3_TEXT, "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
            "rope_parameters",
        ),
        (
            {**GEMMA3, "text_config": {**GEMMA3["text_config"], "final_logit_softcapping": 30.0}},
            "text_config.final_logit_softcapping",
        ),
        ({k: v for k, v in GEMMA3.items() if k != "text_config"}, "text_config"),
        (
            {**GEMMA3, "text_config": {**GEMMA3["text_config"], "attn_logit_softcapping": 50.0}},
            "text_config.attn_logit_softcapping",
        ),
        ({k: v for k, v in GEMMA2.items() if k != "head_dim"}, "head_dim"),
        ({k: v for k, v in GEMMA.items() if k != "num_key_value_heads"}, "num_key_value_heads"),
        ({**GEMMA, "hidden_act": "swiglu"}, "hidden_act"),
        ({**GEMMA2, "hidden_activation": "tanh"}, "hidden_activation"),
    ],
)
def test_refusals(config, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_of(config)


def test_numpy_witness_knows_every_gemma_family():
    for config in (GEMMA, GEMMA2, GEMMA3_TEXT, GEMMA3):
        assert numpy_forward.knows(config), config["model_type"]
    assert float(np.float32(48**0.5)) != 48**0.5  # the test config's factor needs the cast
