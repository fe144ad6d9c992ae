"""GGUF import beyond ``llama``: tiny files of each family written with the gguf package as
llama.cpp's converter writes them (names, metadata, no q/k permutation for Qwen), exported and
compared with the independent NumPy forward of the weights the file holds.

The HF ↔ GGUF naming and the metadata written here are the test's own (from llama.cpp's
``convert_hf_to_gguf.py`` and ``gguf.constants``), not the package's tables.
"""

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf extra is not installed")

import gguf_files  # noqa: E402
import numpy_forward  # noqa: E402
import onnx  # noqa: E402
from decoder_runner import Decoder, positions_for  # noqa: E402
from harness import assert_close  # noqa: E402

from graphattn import export  # noqa: E402
from graphattn.exporters.convert import convert  # noqa: E402
from graphattn.exporters.gguf_reader import GGUFCheckpoint  # noqa: E402
from graphattn.exporters.safetensors_reader import CheckpointError  # noqa: E402

ATOL = 1e-4
TARGETS = ("functions", "portable", "ort")
# Three left-padded rows (lengths 9, 5, 7), then decode steps past YaRN's original context 8.
PROMPTS = [[5, 17, 42, 8, 11, 60, 3, 33, 21], [40, 41, 9, 12, 7], [7, 3, 90, 12, 55, 18, 6]]
DECODE_STEPS = 3

# Qwen2: q/k/v biases, GQA 4/2, untied head, YaRN with a small original context.
QWEN2 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
# Qwen3: head_dim 32 != hidden/heads, MQA, QK-norm per head, tied head, linear RoPE scaling.
QWEN3 = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}
FAMILIES = {"qwen2": QWEN2, "qwen3": QWEN3}

# HF → GGUF names as llama.cpp's TensorNameMap writes them (test side).
OUTER = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def to_gguf(hf: str) -> str:
    if hf in OUTER:
        return OUTER[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LAYER[rest]}"


def hf_shapes(config: dict) -> dict:
    """What Qwen2ForCausalLM / Qwen3ForCausalLM's save_pretrained writes for ``config``."""
    c, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or c // heads
    shapes = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, c)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c,),
            p + "post_attention_layernorm.weight": (c,),
            p + "self_attn.q_proj.weight": (heads * d, c),
            p + "self_attn.k_proj.weight": (kv * d, c),
            p + "self_attn.v_proj.weight": (kv * d, c),
            p + "self_attn.o_proj.weight": (c, heads * d),
            p + "mlp.gate_proj.weight": (f, c),
            p + "mlp.up_proj.weight": (f, c),
            p + "mlp.down_proj.weight": (c, f),
        }
        if config["model_type"] == "qwen2":  # Qwen2Attention: q/k/v with bias, o without
            shapes |= {
                p + "self_attn.q_proj.bias": (heads * d,),
                p + "self_attn.k_proj.bias": (kv * d,),
                p + "self_attn.v_proj.bias": (kv * d,),
            }
        if config["model_type"] == "qwen3":
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def random_weights(config: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("norm.weight"):
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def metadata(config: dict) -> dict:
    """The ``{arch}.*`` keys llama.cpp's TextModel.set_gguf_parameters writes for ``config``."""
    arch = config["model_type"]
    out = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": config["num_attention_heads"],
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.freq_base": config["rope_theta"],
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{arch}.vocab_size": config["vocab_size"],
    }
    if "head_dim" in config:
        out[f"{arch}.attention.key_length"] = config["head_dim"]
        out[f"{arch}.attention.value_length"] = config["head_dim"]
    scaling = config.get("rope_scaling")
    if scaling:
        out[f"{arch}.rope.scaling.type"] = scaling["rope_type"]
        out[f"{arch}.rope.scaling.factor"] = scaling["factor"]
        if scaling["rope_type"] == "yarn":
            key = f"{arch}.rope.scaling.original_context_length"
            out[key] = scaling["original_max_position_embeddings"]
    return out


def write(path, config: dict, kind: str = "F32", seed: int = 0, drop=(), extra=None) -> dict:
    """A GGUF of ``config`` (2-D tensors in ``kind``, 1-D in F32 as llama.cpp keeps them);
    returns the HF-named float32 weights it holds."""
    weights = random_weights(config, seed)
    tensors = {to_gguf(name): array for name, array in weights.items()}
    kinds = {name: kind for name, array in tensors.items() if array.ndim == 2}
    meta = {k: v for k, v in metadata(config).items() if k not in drop} | (extra or {})
    held = gguf_files.write_arch_gguf(path, config["model_type"], meta, tensors, kinds)
    return {name: held[to_gguf(name)] for name in weights}


def left_padded(rows):
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def run_steps(step, steps: int = DECODE_STEPS):
    """Prefill the padded batch, then ``steps`` decode steps with fixed tokens, through
    ``step(ids, mask, past) -> (logits, presents)``; the logits of real positions per step."""
    ids, mask = left_padded(PROMPTS)
    logits, past = step(ids, mask, None)
    out = [np.where(mask[..., None] == 1, logits, 0.0)]
    for n in range(steps):
        token = np.array([[11 + 7 * n + r] for r in range(len(PROMPTS))])
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        logits, past = step(token, mask, past)
        out.append(logits)
    return out


def numpy_steps(held: dict, config: dict):
    def step(ids, mask, past):
        positions = positions_for(mask, ids.shape[1])
        return numpy_forward.forward(held, config, ids, mask, positions, past)

    return run_steps(step)


def export_steps(out_dir):
    decoder = Decoder(out_dir)
    return run_steps(lambda ids, mask, past: decoder(ids, mask, past))


def assert_steps_close(actual, expected, atol, what):
    for n, (a, e) in enumerate(zip(actual, expected)):
        assert_close(np.asarray(a, dtype=np.float64), np.asarray(e), atol, f"{what} step {n}")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    config = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    held = write(root / "f32.gguf", config)
    return request.param, config, root, held


def test_numpy_forward_knows_the_families():
    assert all(numpy_forward.knows(config) for config in FAMILIES.values())


def test_reader_maps_metadata_names_and_keeps_rows(family):
    """config from the metadata, every tensor under its HF name, rows as stored (Qwen's
    converter does not permute q/k)."""
    name, config, root, held = family
    checkpoint = GGUFCheckpoint(root / "f32.gguf")
    for key, value in config.items():
        expected = pytest.approx(value) if key == "rms_norm_eps" else value  # float32 field
        assert checkpoint.config[key] == expected, key
    assert set(checkpoint.tensors) == set(held)
    for tensor, expected in held.items():
        assert_close(checkpoint.load(tensor), expected.astype(np.float64), 0.0, tensor)


@pytest.mark.parametrize("target", TARGETS)
def test_fp32_export_matches_numpy_forward(family, tmp_path, target):
    name, config, root, held = family
    export(root / "f32.gguf", tmp_path / target, target=target, last_logits_only=False)
    expected = numpy_steps(held, config)
    assert_steps_close(export_steps(tmp_path / target), expected, ATOL, f"{name} {target}")


def test_convert_gives_what_transformers_runs(family, tmp_path):
    """The converted HF directory (our config.json from the metadata) loads in transformers
    and computes the NumPy forward's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, config, root, held = family
    convert(root / "f32.gguf", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = np.array([PROMPTS[0]])
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.double().numpy()
    mask = np.ones_like(ids)
    expected, _ = numpy_forward.forward(held, config, ids, mask, positions_for(mask, ids.shape[1]))
    assert_close(logits, expected, ATOL, f"{name} transformers on the converted directory")


@pytest.mark.parametrize("kind,precision", [("Q8_0", "int8"), ("Q4_0", "int4")])
def test_block_quantized_gguf_exports_losslessly(family, tmp_path, kind, precision):
    """A Q8_0/Q4_0 file: the fp32 export equals the NumPy forward of the dequantized weights,
    and the int8/int4 export (its blocks as they are, float compute) equals the fp32 one."""
    name, config, _, _ = family
    path = tmp_path / f"{kind}.gguf"
    held = write(path, config, kind, seed=3)
    export(path, tmp_path / "fp32", target="ort", last_logits_only=False)
    fp32 = export_steps(tmp_path / "fp32")
    assert_steps_close(fp32, numpy_steps(held, config), ATOL, f"{name} {kind} fp32")
    export(
        path,
        tmp_path / precision,
        target="ort",
        precision=precision,
        last_logits_only=False,
        accuracy_level=0,
    )
    graph = onnx.load(str(tmp_path / precision / "model.onnx"), load_external_data=False).graph
    assert "MatMulNBits" in {n.op_type for n in graph.node}
    quantized = export_steps(tmp_path / precision)
    assert_steps_close(quantized, fp32, ATOL, f"{name} {precision} from {kind} vs fp32")


def test_unknown_architecture_is_named(tmp_path):
    write(tmp_path / "moe.gguf", {**QWEN2, "model_type": "qwen2moe"})
    with pytest.raises(CheckpointError, match="GGUF architecture 'qwen2moe' is not supported"):
        GGUFCheckpoint(tmp_path / "moe.gguf")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_missing_metadata_key_is_named(tmp_path, name):
    key = f"{name}.feed_forward_length"
    write(tmp_path / "m.gguf", FAMILIES[name], drop=(key,))
    with pytest.raises(CheckpointError, match=f"GGUF metadata '{key}' is missing"):
        GGUFCheckpoint(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"qwen2.attention.sliding_window": 4}, "qwen2.attention.sliding_window=4 is not"),
        ({"qwen2.rope.scaling.yarn_attn_factor": 0.5}, "yarn_attn_factor=0.5 is not supported"),
        ({"qwen2.rope.scaling.type": "longrope"}, "GGUF rope scaling 'longrope' is not"),
        ({"qwen2.attention.value_length": 8}, "qwen2.attention.value_length=8"),
        ({"qwen2.final_logit_softcapping": 30.0}, "qwen2.final_logit_softcapping=30.0 is not"),
    ],
)
def test_metadata_whose_math_is_not_read_is_refused(tmp_path, extra, message):
    write(tmp_path / "r.gguf", QWEN2, extra=extra)
    with pytest.raises(CheckpointError, match=message):
        GGUFCheckpoint(tmp_path / "r.gguf")


def test_yarn_metadata_is_transformers_yarn():
    """llama.cpp's YaRN (ramp over the original context, cos/sin × 1 + 0.1 ln factor) is
    transformers' yarn with the same factor and original context."""
    from graphattn.models.llama import gguf_rope_scaling

    fields = metadata(QWEN2) | {"qwen2.rope.scaling.yarn_beta_fast": 16.0}
    scaling = gguf_rope_scaling(fields, "qwen2", fields.__getitem__)
    assert scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "beta_fast": 16.0,
    }
