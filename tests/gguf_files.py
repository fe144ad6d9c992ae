"""Tiny GGUF files written by the tests with the gguf package's writer (no download)."""

import json

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: halves → interleaved pairs per head."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def encode(array: np.ndarray, kind: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    if kind == "F32":
        return array.astype(np.float32), None
    if kind == "F16":
        return array.astype(np.float16), None
    qtype = GGMLQuantizationType[kind]
    return quants.quantize(array.astype(np.float32), qtype), qtype


def decoded(array: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values a tensor of ``kind`` holds after quantization (package dequantizer)."""
    data, qtype = encode(array, kind)
    if qtype is None:
        return data.astype(np.float32)
    return quants.dequantize(data, qtype).reshape(array.shape).astype(np.float32)


def tokenizer_metadata(tokenizer_json: dict):
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    for added in tokenizer_json["added_tokens"]:
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    specials = {a["id"] for a in tokenizer_json["added_tokens"] if a["special"]}
    types = [3 if i in specials else 1 for i in range(len(tokens))]
    return tokens, merges, types


def write_gguf(
    path,
    config: dict,
    weights: dict,
    kinds: dict,
    tokenizer_json: dict | None = None,
    arch: str = "llama",
    chat_template: str | None = None,
) -> dict:
    """Write a Llama GGUF; ``kinds`` maps HF names to tensor types (default F32).

    Returns the HF-layout float32 weights the file holds (quantization error included)."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])
    if tokenizer_json is not None:
        tokens, merges, types = tokenizer_metadata(tokenizer_json)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(config["bos_token_id"])
        writer.add_eos_token_id(config["eos_token_id"])
        writer.add_add_bos_token(False)
        if chat_template:
            writer.add_chat_template(chat_template)
    held = {}
    for name, array in weights.items():
        kind = kinds.get(name, "F32")
        stored = array
        if name.endswith("q_proj.weight"):
            stored = rope_permute(array, heads)
        elif name.endswith("k_proj.weight"):
            stored = rope_permute(array, kv_heads)
        data, qtype = encode(stored, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        values = decoded(stored, kind)
        if stored is not array:  # undo the permutation by index, independently of the reader
            order = rope_permute(np.arange(array.shape[0]), heads if "q_proj" in name else kv_heads)
            values = values[np.argsort(order)]
        held[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def load_tokenizer_json(directory) -> dict:
    return json.loads((directory / "tokenizer.json").read_text())


def write_arch_gguf(path, arch: str, metadata: dict, tensors: dict, kinds: dict) -> dict:
    """Write a GGUF of any architecture as a converter would, without renaming or permuting.

    ``metadata``: full keys → values (bool, int → uint32, float → float32, str); ``tensors``:
    GGUF names → float arrays in HF row layout ``[rows, row length]``; ``kinds``: GGUF names →
    tensor types (default F32). Returns the float32 values each tensor holds (quantization
    error included), by GGUF name."""
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    held = {}
    for name, array in tensors.items():
        kind = kinds.get(name, "F32")
        data, qtype = encode(array, kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
        held[name] = decoded(array, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held
