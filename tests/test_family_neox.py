"""GPT-NeoX, GPT-J, CodeGen, GPT-Neo and GPT-BigCode against Hugging Face (tiny random configs).

Each: a left-padded batch (lengths 9/5/7), prefill then 4 decode steps, every target at fp32
(≤ 1e-4); the NumPy witness (``numpy_forward_neox``) on the prefill and every decode step with
its own cache; precisions for one config per family; the ort lowering per layer; and the config
values each family refuses."""

import copy
import json

import families
import numpy as np
import numpy_forward
import numpy_forward_neox
import onnx
import pytest
from decoder_runner import positions_for
from harness import assert_close

from graphattn.models import architecture_for

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

GQA = "GroupQueryAttention"
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": 96}

NEOX_PARALLEL = {
    **TOKENS,
    "model_type": "gpt_neox",
    "architectures": ["GPTNeoXForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,  # head_dim 16
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "hidden_act": "gelu",
    "use_parallel_residual": True,
    "attention_bias": True,
    "rotary_pct": 0.5,  # 8 of 16 channels rotate
    "rotary_emb_base": 500.0,
    "max_position_embeddings": 32,
    "layer_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# dynamic NTK over max_position_embeddings=8: the prompt (9) and decode steps cross it
NEOX_DYNAMIC = {
    **NEOX_PARALLEL,
    "max_position_embeddings": 8,
    "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
}
NEOX_SEQUENTIAL = {
    **TOKENS,
    "model_type": "gpt_neox",
    "architectures": ["GPTNeoXForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 2,  # head_dim 32: GroupQueryAttention applies
    "num_hidden_layers": 3,
    "intermediate_size": 80,
    "hidden_act": "gelu_new",
    "use_parallel_residual": False,
    "attention_bias": False,  # no q/k/v or dense biases
    "rotary_pct": 0.5,  # rotary_dim 16
    "max_position_embeddings": 32,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "tie_word_embeddings": True,
}
GPTJ = {
    **TOKENS,
    "model_type": "gptj",
    "architectures": ["GPTJForCausalLM"],
    "n_embd": 64,
    "n_head": 2,  # head_dim 32
    "n_layer": 2,
    "n_inner": 96,
    "n_positions": 32,
    "rotary_dim": 16,  # partial, interleaved pairs
    "activation_function": "gelu_new",
    "tie_word_embeddings": False,
}
CODEGEN = {
    **TOKENS,
    "model_type": "codegen",
    "architectures": ["CodeGenForCausalLM"],
    "n_embd": 64,
    "n_head": 2,  # head_dim 32 spans two of the 4 shards (16 rows each) of qkv_proj
    "n_layer": 2,
    "n_inner": 80,
    "n_positions": 32,
    "n_ctx": 32,
    "rotary_dim": 16,
    "activation_function": "gelu_new",
}
CODEGEN_NARROW_HEADS = {**CODEGEN, "n_head": 8, "rotary_dim": 4}  # head_dim 8 < shard 16
GPT_NEO = {
    **TOKENS,
    "model_type": "gpt_neo",
    "architectures": ["GPTNeoForCausalLM"],
    "hidden_size": 64,
    "num_heads": 2,  # head_dim 32
    "num_layers": 3,
    "attention_types": [[["global", "local"], 1], [["local"], 1]],  # global, local, local
    "window_size": 3,  # smaller than the prompt
    "intermediate_size": 96,
    "max_position_embeddings": 32,
    "activation_function": "gelu_new",
}
BIGCODE_MQA = {
    **TOKENS,
    "model_type": "gpt_bigcode",
    "architectures": ["GPTBigCodeForCausalLM"],
    "n_embd": 64,
    "n_head": 4,  # head_dim 16, one key/value head
    "n_layer": 2,
    "n_inner": 96,
    "n_positions": 32,
    "multi_query": True,
    "activation_function": "gelu_pytorch_tanh",
}
BIGCODE_MHA = {
    **BIGCODE_MQA,
    "n_head": 2,  # head_dim 32
    "multi_query": False,  # c_attn rows grouped per head
    "scale_attn_weights": False,  # scores unscaled
    "tie_word_embeddings": False,
    "activation_function": "gelu",
}
ALL = (NEOX_PARALLEL, NEOX_SEQUENTIAL, GPTJ, CODEGEN, GPT_NEO, BIGCODE_MQA, BIGCODE_MHA)


def check(tmp_path, config, **kw):
    """families.check_family on a copy (transformers' GPT-NeoX config writes into the
    ``rope_scaling`` dict it is given)."""
    return families.check_family(tmp_path, copy.deepcopy(config), **kw)


def saved_config(tmp_path):
    return json.loads((tmp_path / "hf" / "config.json").read_text())


def ort_nodes(export_dir, op_type):
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == op_type]


def attribute(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def witness(tmp_path, steps=4):
    """The NumPy forward of the saved checkpoint against HF eager: prefill and ``steps``
    greedy decode steps, each from the NumPy forward's own presents."""
    import transformers

    hf_dir = tmp_path / "hf"
    saved = saved_config(tmp_path)
    assert numpy_forward.knows(saved)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    ids, mask = families.left_padded(families.PROMPTS)
    theirs, fed = families.hf_steps(model.eval().float(), ids, mask, steps)
    weights = families.hf_weights(hf_dir)
    config = numpy_forward_neox.with_common_names(saved)
    past, step_ids, step_mask = None, ids, mask
    for call, (hf, token) in enumerate(zip(theirs, fed)):
        positions = positions_for(step_mask, step_ids.shape[1])
        ours, past = numpy_forward.forward(weights, config, step_ids, step_mask, positions, past)
        real = step_mask[:, -step_ids.shape[1] :, None].astype(bool)
        assert_close(np.where(real, ours, 0), np.where(real, hf, 0), 1e-4, f"numpy call {call}")
        step_ids, step_mask = token, np.concatenate([step_mask, np.ones_like(token)], axis=1)


def test_numpy_witness_knows_every_family():
    for config in ALL:
        assert numpy_forward.knows(config), config["model_type"]


# ------------------------------------------------------------------------------ GPT-NeoX
def test_gpt_neox_parallel_matches_transformers(tmp_path):
    exports = check(tmp_path, NEOX_PARALLEL)
    witness(tmp_path)
    cfg = architecture_for(NEOX_PARALLEL).config_from_hf(saved_config(tmp_path))
    layer = cfg.layers[0]
    assert layer.residual == "parallel" and set(layer.norms) == {"attn_norm", "mlp_norm"}
    rope = layer.attention.rope
    assert (rope.rotary_dim, rope.theta, rope.interleaved, rope.scaling) == (8, 500.0, False, None)
    # 8 rotary channels: the kernel's cos/sin cache needs a width (R/2) that is a multiple of 8
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "multiple of 8, got 4" in decisions[0]["reasons"][GQA]


def test_gpt_neox_dynamic_rope_matches_transformers(tmp_path):
    """Dynamic NTK over max_position_embeddings=8: the prompt (9) and every decode step
    recompute the base from the call's length, as HF does."""
    exports = check(tmp_path, NEOX_DYNAMIC)
    witness(tmp_path)
    rope = architecture_for(NEOX_DYNAMIC).config_from_hf(saved_config(tmp_path)).layers[0]
    assert rope.attention.rope.scaling == {"rope_type": "dynamic", "factor": 2.0}
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "dynamic RoPE changes its frequencies per call" in decisions[0]["reasons"][GQA]


def test_gpt_neox_sequential_linear_matches_transformers(tmp_path):
    exports = check(tmp_path, NEOX_SEQUENTIAL)
    witness(tmp_path)
    cfg = architecture_for(NEOX_SEQUENTIAL).config_from_hf(saved_config(tmp_path))
    assert cfg.layers[0].residual == "sequential" and cfg.tie_word_embeddings
    assert cfg.layers[0].attention.rope.scaling["rope_type"] == "linear"
    weights = families.hf_weights(tmp_path / "hf")
    assert not any(name.endswith(("query_key_value.bias", "dense.bias")) for name in weights)
    assert families.kernels(exports["ort"]) == [GQA] * 3
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "rotary_interleaved") for n in nodes] == [0] * 3
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_gpt_neox_legacy_rope_keys():
    """Older files: ``rope_scaling`` with ``type``, ``rotary_emb_base``, ``rotary_pct``."""
    config = {
        **NEOX_SEQUENTIAL,
        "rotary_emb_base": 1000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    rope = architecture_for(config).config_from_hf(config).layers[0].attention.rope
    assert (rope.rotary_dim, rope.theta) == (16, 1000.0)
    assert rope.scaling == {"rope_type": "linear", "factor": 4.0}
    default = {k: v for k, v in config.items() if k not in ("rotary_pct", "rope_scaling")}
    rope = architecture_for(default).config_from_hf(default).layers[0].attention.rope
    assert rope.rotary_dim == 8 and rope.scaling is None  # HF's default rotary_pct 0.25


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"rotary_pct": 0.3}, "rotary_pct"),  # int(32 * 0.3) = 9 channels: odd
        ({"head_dim": 16}, "head_dim"),
        ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ],
)
def test_gpt_neox_refuses(changes, key):
    config = {**NEOX_SEQUENTIAL, **changes}
    with pytest.raises(ValueError, match=f"config.json {key}="):
        architecture_for(config).config_from_hf(config)


# --------------------------------------------------------------------------------- GPT-J
def test_gptj_matches_transformers(tmp_path):
    exports = check(tmp_path, GPTJ, numpy_check=False)
    witness(tmp_path)
    cfg = architecture_for(GPTJ).config_from_hf(saved_config(tmp_path))
    layer = cfg.layers[0]
    assert layer.residual == "parallel" and set(layer.norms) == {"attn_norm"}
    rope = layer.attention.rope
    assert (rope.rotary_dim, rope.interleaved, rope.theta) == (16, True, 10000.0)
    assert families.kernels(exports["ort"]) == [GQA, GQA]
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "rotary_interleaved") for n in nodes] == [1, 1]
    families.check_precisions(tmp_path / "hf", tmp_path)


@pytest.mark.parametrize(
    ("changes", "key"),
    [({"rotary_dim": None}, "rotary_dim"), ({"rotary_dim": 7}, "rotary_dim")],
)
def test_gptj_refuses(changes, key):
    config = {**GPTJ, **changes}
    with pytest.raises(ValueError, match=f"config.json {key}="):
        architecture_for(config).config_from_hf(config)


# ------------------------------------------------------------------------------- CodeGen
def test_codegen_matches_transformers(tmp_path):
    exports = check(tmp_path, CODEGEN, numpy_check=False)
    witness(tmp_path)
    assert families.kernels(exports["ort"]) == [GQA, GQA]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_codegen_narrow_heads_matches_transformers(tmp_path):
    """head_dim 8: each shard of qkv_proj holds two heads; the kernel needs head_dim % 16."""
    exports = check(tmp_path, CODEGEN_NARROW_HEADS, targets=("portable", "ort"), numpy_check=False)
    witness(tmp_path, steps=1)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "head_dim 8 is not a multiple of 16" in decisions[0]["reasons"][GQA]


def test_codegen_qkv_rows():
    """The fused rows: per shard of C/4 rows, queries, then values, then keys."""
    cfg = architecture_for(CODEGEN).config_from_hf(CODEGEN)
    plan = architecture_for(CODEGEN).weights(cfg)
    fused = np.arange(3 * 64, dtype=np.float32)[:, None] * np.ones((1, 64), np.float32)
    shard = np.arange(4)[:, None] * 48
    expected = {
        part: (shard + offset + np.arange(16)).ravel() for part, offset in zip("qvk", (0, 16, 32))
    }
    for part in "qkv":
        source = plan[f"layers.0.{part}.weight"]
        assert source.source == "transformer.h.0.attn.qkv_proj.weight"
        got = source.transform(fused)  # [in, out]: column j is output row j
        assert got.shape == (64, 64)
        np.testing.assert_array_equal(got[0], expected[part])


def test_codegen_refuses():
    config = {**CODEGEN, "n_embd": 66, "n_head": 3}
    with pytest.raises(ValueError, match="mp_num=4"):
        architecture_for(config).config_from_hf(config)


# ------------------------------------------------------------------------------- GPT-Neo
def test_gpt_neo_matches_transformers(tmp_path):
    exports = check(tmp_path, GPT_NEO, numpy_check=False)
    witness(tmp_path)
    cfg = architecture_for(GPT_NEO).config_from_hf(saved_config(tmp_path))
    assert cfg.positions == "learned" and cfg.tie_word_embeddings
    assert [layer.attention.window for layer in cfg.layers] == [None, 3, 3]
    assert all(
        layer.attention.scale == 1.0 and layer.attention.rope is None for layer in cfg.layers
    )
    # learned positions: GroupQueryAttention without rotary, the window as local_window_size
    assert families.kernels(exports["ort"]) == [GQA] * 3
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "do_rotary") for n in nodes] == [0] * 3
    assert [attribute(n, "scale") for n in nodes] == [1.0] * 3
    windows = [
        next(
            (
                onnx.helper.get_attribute_value(a)
                for a in n.attribute
                if a.name == "local_window_size"
            ),
            None,
        )
        for n in nodes
    ]
    assert windows == [None, 3, 3]
    families.check_precisions(tmp_path / "hf", tmp_path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"attention_types": [[["global", "sparse"], 1], [["local"], 1]]}, "attention_types"),
        ({"attention_types": [[["global", "local"], 2]]}, "attention_types expand to 4"),
    ],
)
def test_gpt_neo_refuses(changes, match):
    config = {**GPT_NEO, **changes}
    with pytest.raises(ValueError, match=match):
        architecture_for(config).config_from_hf(config)


# --------------------------------------------------------------------------- GPT-BigCode
def test_gpt_bigcode_mqa_matches_transformers(tmp_path):
    exports = check(tmp_path, BIGCODE_MQA, numpy_check=False)
    witness(tmp_path)
    cfg = architecture_for(BIGCODE_MQA).config_from_hf(saved_config(tmp_path))
    assert (cfg.num_heads, cfg.kv_heads, cfg.head_dim) == (4, 1, 16)
    plan = architecture_for(BIGCODE_MQA).weights(cfg)
    assert plan["layers.0.k.weight"].graph_shape == (64, 16)
    assert families.kernels(exports["ort"]) == [GQA, GQA]
    nodes = ort_nodes(exports["ort"], GQA)
    assert [attribute(n, "kv_num_heads") for n in nodes] == [1, 1]
    assert [attribute(n, "do_rotary") for n in nodes] == [0, 0]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_gpt_bigcode_mha_matches_transformers(tmp_path):
    exports = check(tmp_path, BIGCODE_MHA, numpy_check=False)
    witness(tmp_path)
    cfg = architecture_for(BIGCODE_MHA).config_from_hf(saved_config(tmp_path))
    assert cfg.kv_heads == cfg.num_heads == 2 and cfg.layers[0].attention.scale == 1.0
    assert not cfg.tie_word_embeddings
    assert families.kernels(exports["ort"]) == [GQA, GQA]


def test_gpt_bigcode_refuses():
    config = {**BIGCODE_MQA, "add_cross_attention": True}
    with pytest.raises(ValueError, match="config.json add_cross_attention="):
        architecture_for(config).config_from_hf(config)
