"""Tiny random HF checkpoints written by the tests (config.json + safetensors), no download."""

import json
import struct
from pathlib import Path

import numpy as np

GPT2 = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 96,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 64,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}
LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def llama_variant(**changes):
    return {**LLAMA, **changes}


# head_dim 16, GQA 4/2, tied table: the lossless GGUF tests' model (every block format fits)
LLAMA_TIED_WIDE = llama_variant(
    hidden_size=64,
    intermediate_size=96,
    vocab_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


LLAMA_VARIANTS = {
    "llama-gqa": LLAMA,
    "llama-mha-tied": llama_variant(num_key_value_heads=4, tie_word_embeddings=True),
    "llama-mqa": llama_variant(num_key_value_heads=1),
    "llama-linear-rope": llama_variant(rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-llama3-rope": llama_variant(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-odd-head-dim-bias": llama_variant(head_dim=6, attention_bias=True),
    "mistral-window": llama_variant(
        model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=3
    ),
    "qwen2-bias": llama_variant(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
}
ALL_VARIANTS = {
    "gpt2": GPT2,
    "gpt2-untied": {**GPT2, "tie_word_embeddings": False},
    **LLAMA_VARIANTS,
}


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names → shapes for a config (what save_pretrained would write)."""
    if config["model_type"] == "gpt2":
        c, v = config["n_embd"], config["vocab_size"]
        shapes = {
            "transformer.wte.weight": (v, c),
            "transformer.wpe.weight": (config["n_positions"], c),
            "transformer.ln_f.weight": (c,),
            "transformer.ln_f.bias": (c,),
        }
        for i in range(config["n_layer"]):
            p = f"transformer.h.{i}."
            shapes |= {
                p + "ln_1.weight": (c,),
                p + "ln_1.bias": (c,),
                p + "ln_2.weight": (c,),
                p + "ln_2.bias": (c,),
                p + "attn.c_attn.weight": (c, 3 * c),
                p + "attn.c_attn.bias": (3 * c,),
                p + "attn.c_proj.weight": (c, c),
                p + "attn.c_proj.bias": (c,),
                p + "mlp.c_fc.weight": (c, 4 * c),
                p + "mlp.c_fc.bias": (4 * c,),
                p + "mlp.c_proj.weight": (4 * c, c),
                p + "mlp.c_proj.bias": (c,),
            }
        if not config.get("tie_word_embeddings", True):
            shapes["lm_head.weight"] = (v, c)
        return shapes
    c, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    d = config.get("head_dim") or c // heads
    qkv_bias = config.get("attention_bias", False) or config["model_type"] == "qwen2"
    o_bias = config.get("attention_bias", False) and config["model_type"] == "llama"
    shapes = {"model.embed_tokens.weight": (v, c), "model.norm.weight": (c,)}
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
        if qkv_bias:
            shapes |= {
                p + f"self_attn.{x}_proj.bias": (n * d,)
                for x, n in (("q", heads), ("k", kv), ("v", kv))
            }
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (c,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, c)
    return shapes


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def _to_bf16_bits(array: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """A minimal independent safetensors writer (F32, F16 or BF16)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        if dtype == "BF16":
            raw = _to_bf16_bits(array).tobytes()
        else:
            raw = np.ascontiguousarray(
                array, dtype={"F32": np.float32, "F16": np.float16}[dtype]
            ).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def stored_weights(weights: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The float32 values a checkpoint of ``dtype`` actually holds (after rounding)."""
    if dtype == "F16":
        return {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    if dtype == "BF16":
        return {
            k: (_to_bf16_bits(v).astype(np.uint32) << 16).view(np.float32)
            for k, v in weights.items()
        }
    return weights


def write_checkpoint(
    directory: Path, config: dict, *, seed: int = 0, dtype: str = "F32", shards: int = 1
) -> dict[str, np.ndarray]:
    """Write config.json + safetensors (an index when shards > 1); returns the stored weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    weights = random_weights(config, seed)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", weights, dtype)
    else:
        names = list(weights)
        weight_map = {}
        for shard in range(shards):
            file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[shard::shards]}
            write_safetensors(directory / file, part, dtype)
            weight_map |= {n: file for n in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return stored_weights(weights, dtype)
