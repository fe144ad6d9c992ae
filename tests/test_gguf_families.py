"""GGUF import beyond ``llama``: tiny files of each family written with the gguf package as
llama.cpp's ``convert_hf_to_gguf.py`` writes them, exported and compared with the independent
NumPy forward of the weights the file holds.

The test side is its own: HF → GGUF names from the gguf package's ``TensorNameMap`` (llama.cpp's
table), the metadata each converter writes, no q/k permutation (only llama.cpp's Llama-style
converters permute), Gemma norms stored as ``1 + w`` (the Gemma converters add one), Phi-3's
fused ``qkv_proj`` / ``gate_up_proj`` kept as ``attn_qkv`` / ``ffn_up``.
"""

import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

import gguf_files  # noqa: E402
import numpy_forward  # noqa: E402
import onnx  # noqa: E402
from decoder_runner import Decoder, positions_for  # noqa: E402
from harness import assert_close  # noqa: E402

from graphattn import export  # noqa: E402
from graphattn.exporters.convert import convert  # noqa: E402
from graphattn.exporters.gguf_reader import GGUFCheckpoint  # noqa: E402
from graphattn.exporters.safetensors_reader import CheckpointError  # noqa: E402
from graphattn.models import REGISTRY, architecture_for, gemma_gguf, phi3_gguf  # noqa: E402

ATOL = 1e-4
TARGETS = ("functions", "portable", "ort")
# Three left-padded rows (lengths 9, 5, 7), then decode steps (past YaRN's original context 8).
PROMPTS = [[5, 17, 42, 8, 11, 60, 3, 33, 21], [40, 41, 9, 12, 7], [7, 3, 90, 12, 55, 18, 6]]
DECODE_STEPS = 3
EPS = 2.0**-20  # exact in a float32 field, so configs compare equal
SLIDE, FULL = "sliding_attention", "full_attention"
BASE = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": EPS,
    "rope_theta": 10000.0,
}
# Qwen2: q/k/v biases, GQA 4/2, untied head, YaRN with a small original context.
QWEN2 = {
    **BASE,
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "max_position_embeddings": 32,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
# Qwen3: head_dim 32 != hidden/heads, MQA, QK-norm per head, tied head, linear RoPE scaling.
QWEN3 = {
    **BASE,
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "num_key_value_heads": 1,
    "head_dim": 32,
    "rope_theta": 1000000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}
# Gemma: (1 + w) norms, GeGLU, sqrt(hidden) embedding scale, head_dim 32, MQA, tied.
GEMMA = {
    **BASE,
    "model_type": "gemma",
    "architectures": ["GemmaForCausalLM"],
    "num_key_value_heads": 1,
    "head_dim": 32,
    "hidden_act": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
}
# Gemma 2: sandwich norms, softcaps that bite, window 4 on even layers, 3 layers.
GEMMA2 = {
    **BASE,
    "model_type": "gemma2",
    "architectures": ["Gemma2ForCausalLM"],
    "num_hidden_layers": 3,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,  # llama.cpp: key_length outside the 27B layout
    "sliding_window": 4,
    "layer_types": [SLIDE, FULL, SLIDE],
    "attn_logit_softcapping": 2.0,
    "final_logit_softcapping": 3.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
}
# Gemma 3: QK-norms (1 + w), six layers (five local of window 3, then a global one), local
# base 10000 unscaled, global base 1e6 with linear scaling, head_dim 32, MQA.
GEMMA3 = {
    **BASE,
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "num_hidden_layers": 6,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 3,
    "layer_types": [SLIDE] * 5 + [FULL],
    "rope_theta": 1000000.0,
    "rope_parameters": {
        FULL: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        SLIDE: {"rope_type": "default", "rope_theta": 10000.0},
    },
    "final_logit_softcapping": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
}
# Phi-3: fused qkv / gate_up, partial rotary 0.5, window 4 on every layer, untied.
PHI3 = {
    **BASE,
    "model_type": "phi3",
    "architectures": ["Phi3ForCausalLM"],
    "original_max_position_embeddings": 64,
    "partial_rotary_factor": 0.5,
    "sliding_window": 4,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
FAMILIES = {
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3": GEMMA3,
    "phi3": PHI3,
}
# general.architecture of each (llama.cpp's MODEL_ARCH name)
ARCH = {"gemma3_text": "gemma3"}
# Registry entries that read these files (models/__init__.py points at them; set here too so
# the GGUF tests run whatever the registry line says — test_registry checks the lines).
GGUF_ARCHITECTURES = {
    "gemma": gemma_gguf.ARCHITECTURE,
    "gemma2": gemma_gguf.GEMMA2_ARCHITECTURE,
    "gemma3_text": gemma_gguf.GEMMA3_ARCHITECTURE,
    "phi3": phi3_gguf.ARCHITECTURE,
}


@pytest.fixture(autouse=True)
def gguf_registry(monkeypatch, request):
    if request.node.name == "test_registry_points_at_the_gguf_readings":
        return
    for model_type, architecture in GGUF_ARCHITECTURES.items():
        monkeypatch.setitem(REGISTRY, model_type, architecture)


def arch_of(config: dict) -> str:
    return ARCH.get(config["model_type"], config["model_type"])


def is_gemma(config: dict) -> bool:
    return config["model_type"].startswith("gemma")


def hf_shapes(config: dict) -> dict:
    """What the family's ``save_pretrained`` writes for ``config``."""
    kind = config["model_type"]
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
            p + "self_attn.o_proj.weight": (c, heads * d),
            p + "mlp.down_proj.weight": (c, f),
        }
        if kind == "phi3":
            shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * d, c)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * f, c)
            continue
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * d, c),
            p + "self_attn.k_proj.weight": (kv * d, c),
            p + "self_attn.v_proj.weight": (kv * d, c),
            p + "mlp.gate_proj.weight": (f, c),
            p + "mlp.up_proj.weight": (f, c),
        }
        if kind == "qwen2":  # Qwen2Attention: q/k/v with bias, o without
            shapes |= {
                p + "self_attn.q_proj.bias": (heads * d,),
                p + "self_attn.k_proj.bias": (kv * d,),
                p + "self_attn.v_proj.bias": (kv * d,),
            }
        if kind in ("gemma2", "gemma3_text"):
            shapes[p + "pre_feedforward_layernorm.weight"] = (c,)
            shapes[p + "post_feedforward_layernorm.weight"] = (c,)
        if kind in ("qwen3", "gemma3_text"):
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def random_weights(config: dict, seed: int) -> dict:
    """Norms near one (near zero for Gemma's ``1 + w``), the rest 0.2·N(0, 1)."""
    rng = np.random.default_rng(seed)
    centre = 0.0 if is_gemma(config) else 1.0
    weights = {}
    for name, shape in hf_shapes(config).items():
        if name.endswith("norm.weight"):
            weights[name] = (centre + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def to_gguf(hf: str, config: dict) -> str:
    """llama.cpp's name for an HF tensor (the gguf package's TensorNameMap)."""
    arch = gguf.MODEL_ARCH[arch_of(config).upper()]
    table = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    name = table.get_name(hf, try_suffixes=(".weight", ".bias"))
    assert name is not None, hf
    return name


def metadata(config: dict) -> dict:
    """The ``{arch}.*`` keys the family's converter writes for ``config``."""
    arch = arch_of(config)
    heads = config["num_attention_heads"]
    out = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        f"{arch}.vocab_size": config["vocab_size"],
    }
    if arch != "gemma2":  # Gemma2Model.set_gguf_parameters writes no base (10000)
        out[f"{arch}.rope.freq_base"] = config["rope_theta"]
    if "head_dim" in config:
        out[f"{arch}.attention.key_length"] = config["head_dim"]
        out[f"{arch}.attention.value_length"] = config["head_dim"]
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {}).get(FULL)
    if scaling and scaling["rope_type"] != "default":
        out[f"{arch}.rope.scaling.type"] = scaling["rope_type"]
        out[f"{arch}.rope.scaling.factor"] = scaling["factor"]
        if scaling["rope_type"] == "yarn":
            key = f"{arch}.rope.scaling.original_context_length"
            out[key] = scaling["original_max_position_embeddings"]
    if arch in ("gemma2", "gemma3", "phi3"):
        out[f"{arch}.attention.sliding_window"] = config["sliding_window"]
    if arch == "gemma2":
        out["gemma2.attn_logit_softcapping"] = config["attn_logit_softcapping"]
        out["gemma2.final_logit_softcapping"] = config["final_logit_softcapping"]
    if arch == "phi3":
        rotary = int(config["partial_rotary_factor"] * config["hidden_size"]) // heads
        out["phi3.rope.dimension_count"] = rotary
        out["phi3.rope.scaling.original_context_length"] = config[
            "original_max_position_embeddings"
        ]
    return out


def write(path, config: dict, kind: str = "F32", seed: int = 0, drop=(), extra=None) -> dict:
    """A GGUF of ``config`` (2-D tensors in ``kind``, 1-D in F32 as llama.cpp keeps them; Gemma
    norms as ``1 + w``); returns the HF-named float32 weights it holds."""
    weights = random_weights(config, seed)
    offset = 1.0 if is_gemma(config) else 0.0
    tensors = {
        to_gguf(name, config): array + np.float32(offset) if name.endswith("norm.weight") else array
        for name, array in weights.items()
    }
    kinds = {name: kind for name, array in tensors.items() if array.ndim == 2}
    meta = {k: v for k, v in metadata(config).items() if k not in drop} | (extra or {})
    held = gguf_files.write_arch_gguf(path, arch_of(config), meta, tensors, kinds)
    out = {}
    for name in weights:
        value = held[to_gguf(name, config)].astype(np.float64)
        out[name] = value - offset if name.endswith("norm.weight") else value
    return out


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


def model_config(config: dict):
    """The package's ModelConfig of an HF config, without family-private extras."""
    cfg = architecture_for(config).config_from_hf(config)
    return dataclasses.replace(cfg, extra={})


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    config = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    held = write(root / "f32.gguf", config)
    return request.param, config, root, held


def test_registry_points_at_the_gguf_readings():
    """models/__init__.py registers the architectures that read these GGUF files."""
    from graphattn import models

    for model_type, architecture in GGUF_ARCHITECTURES.items():
        assert models.REGISTRY[model_type].gguf is architecture.gguf, model_type


def test_numpy_forward_knows_the_families():
    assert all(numpy_forward.knows(config) for config in FAMILIES.values())


def test_reader_maps_metadata_names_and_keeps_rows(family):
    """The config from the metadata describes the same model as the HF config, every tensor
    sits under its HF name with its rows as stored (no family here is permuted), and Gemma's
    norms are read as the file's scales."""
    name, config, root, held = family
    checkpoint = GGUFCheckpoint(root / "f32.gguf")
    assert model_config(checkpoint.config) == model_config(config)
    assert checkpoint.config["architectures"] == config["architectures"]
    assert set(checkpoint.tensors) == set(held)
    for tensor, expected in held.items():
        stored = expected + 1.0 if is_gemma(config) and tensor.endswith("norm.weight") else expected
        assert_close(checkpoint.load(tensor), stored, 0.0, tensor)


@pytest.mark.parametrize("target", TARGETS)
def test_fp32_export_matches_numpy_forward(family, tmp_path, target):
    name, config, root, held = family
    export(root / "f32.gguf", tmp_path / target, target=target, last_logits_only=False)
    expected = numpy_steps(held, config)
    assert_steps_close(export_steps(tmp_path / target), expected, ATOL, f"{name} {target}")


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


def test_convert_gives_what_transformers_runs(family, tmp_path, request):
    """The converted HF directory (config.json from the metadata) loads in transformers and
    computes the NumPy forward's logits (Gemma: see test_gemma_convert_keeps_scales)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, config, root, held = family
    if is_gemma(config):
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="convert writes a Gemma GGUF's norms as stored (the scales 1 + w) under"
                " HF names, which transformers reads as w and offsets by one again; our own"
                " exporter reads the converted directory right (test_gemma_convert_keeps_scales)",
            )
        )
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


def test_gemma_convert_keeps_scales_and_reexports(tmp_path):
    """convert writes a Gemma file's norms as stored (the scales 1 + w) with the marker in
    config.json, so exporting the converted directory computes what the GGUF's export does."""
    path = tmp_path / "g.gguf"
    held = write(path, GEMMA2, seed=4)
    convert(path, tmp_path / "hf")
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    norm = "model.layers.0.pre_feedforward_layernorm.weight"
    assert_close(tensors[norm], held[norm] + 1.0, 0.0, norm)
    export(tmp_path / "hf", tmp_path / "onnx", target="ort", last_logits_only=False)
    expected = numpy_steps(held, GEMMA2)
    assert_steps_close(export_steps(tmp_path / "onnx"), expected, ATOL, "gemma2 via convert")


@pytest.mark.parametrize(
    "arch,blocks,scalar",
    [("gemma2", 46, 4608 // 32), ("gemma2", 42, 256), ("gemma3", 62, 5376 // 32)],
)
def test_gemma_attention_scale_follows_llama_cpp(tmp_path, arch, blocks, scalar):
    """The files state no query_pre_attn_scalar: llama.cpp uses hidden/heads for the 27B
    layouts (by block count), key_length otherwise."""
    hidden = {"gemma2": 4608 if blocks == 46 else 3584, "gemma3": 5376}[arch]
    meta = {
        f"{arch}.block_count": blocks,
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": 4 * hidden,
        f"{arch}.attention.head_count": 32 if blocks != 42 else 16,
        f"{arch}.attention.head_count_kv": 16,
        f"{arch}.attention.key_length": 128 if blocks != 42 else 256,
        f"{arch}.attention.value_length": 128 if blocks != 42 else 256,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.vocab_size": 256,
        f"{arch}.attention.sliding_window": 4096,
    }
    gguf_files.write_arch_gguf(tmp_path / "m.gguf", arch, meta, {}, {})
    config = GGUFCheckpoint(tmp_path / "m.gguf").config
    assert config["query_pre_attn_scalar"] == scalar
    if arch == "gemma3":  # five local layers of six, local base 10000
        assert config["layer_types"][:6] == [SLIDE] * 5 + [FULL]
        assert config["rope_local_base_freq"] == 10000.0


def test_gemma3_without_window_has_only_global_layers(tmp_path):
    """llama.cpp runs a Gemma 3 file without attention.sliding_window (or 0) with no local
    layers."""
    path = tmp_path / "g.gguf"
    write(path, GEMMA3, drop=("gemma3.attention.sliding_window",))
    config = GGUFCheckpoint(path).config
    assert config["layer_types"] == [FULL] * 6 and config["sliding_window"] is None
    assert all(layer.attention.window is None for layer in model_config(config).layers)


def test_unknown_architecture_is_named(tmp_path):
    meta = {k.replace("qwen2.", "qwen2moe."): v for k, v in metadata(QWEN2).items()}
    gguf_files.write_arch_gguf(tmp_path / "moe.gguf", "qwen2moe", meta, {}, {})
    with pytest.raises(CheckpointError, match="GGUF architecture 'qwen2moe' is not supported"):
        GGUFCheckpoint(tmp_path / "moe.gguf")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_missing_metadata_key_is_named(tmp_path, name):
    config = FAMILIES[name]
    key = f"{arch_of(config)}.feed_forward_length"
    write(tmp_path / "m.gguf", config, drop=(key,))
    with pytest.raises(CheckpointError, match=f"GGUF metadata '{key}' is missing"):
        GGUFCheckpoint(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    "config,extra,message",
    [
        (QWEN2, {"qwen2.attention.sliding_window": 4}, "qwen2.attention.sliding_window=4 is"),
        (QWEN2, {"qwen2.rope.scaling.yarn_attn_factor": 0.5}, "yarn_attn_factor=0.5 is not"),
        (QWEN2, {"qwen2.rope.scaling.type": "longrope"}, "GGUF rope scaling 'longrope' is not"),
        (QWEN2, {"qwen2.attention.value_length": 8}, "qwen2.attention.value_length=8"),
        (QWEN3, {"qwen3.final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not"),
        (GEMMA2, {"gemma2.attention.scale": 0.5}, "gemma2.attention.scale=0.5 is not"),
        (GEMMA3, {"gemma3.attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not"),
        (PHI3, {"phi3.rope.scaling.attn_factor": 1.19}, "GGUF LongRoPE .* is not supported"),
    ],
)
def test_metadata_whose_math_is_not_read_is_refused(tmp_path, config, extra, message):
    write(tmp_path / "r.gguf", config, extra=extra)
    with pytest.raises(CheckpointError, match=message):
        GGUFCheckpoint(tmp_path / "r.gguf")


def test_phi3_longrope_factors_are_refused(tmp_path):
    """LongRoPE factors live in tensors the reader cannot turn into config values."""
    path = tmp_path / "p.gguf"
    tensors = {"rope_factors_long.weight": np.ones(4, np.float32)}
    gguf_files.write_arch_gguf(path, "phi3", metadata(PHI3), tensors, {})
    with pytest.raises(CheckpointError, match="unexpected GGUF tensor 'rope_factors_long.weight'"):
        GGUFCheckpoint(path)


def test_yarn_metadata_is_transformers_yarn():
    """llama.cpp's YaRN (ramp over the original context and beta_fast/beta_slow, cos/sin
    times 1 + 0.1 ln factor) is transformers' yarn with the same parameters."""
    from graphattn.models.llama import gguf_rope_scaling

    fields = metadata(QWEN2) | {"qwen2.rope.scaling.yarn_beta_fast": 16.0}
    scaling = gguf_rope_scaling(fields, "qwen2", fields.__getitem__)
    assert scaling == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8,
        "beta_fast": 16.0,
    }
