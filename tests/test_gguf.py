"""GGUF import on tiny files the tests write: every supported tensor type, the Q/K
un-permutation, the tokenizer built from GGUF metadata, convert, and bad input."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf extra is not installed")

import bpe_reference  # noqa: E402
import checkpoints  # noqa: E402
import gguf_files  # noqa: E402
import numpy_forward  # noqa: E402
import tiny_tokenizer  # noqa: E402
from decoder_runner import Decoder, positions_for  # noqa: E402
from harness import assert_close  # noqa: E402

from graphattn import export  # noqa: E402
from graphattn.exporters.convert import convert  # noqa: E402
from graphattn.exporters.gguf_reader import GGUFCheckpoint  # noqa: E402
from graphattn.exporters.safetensors_reader import CheckpointError  # noqa: E402
from graphattn.runtime import Generator, Tokenizer  # noqa: E402

CONFIG = {
    **checkpoints.LLAMA,
    "hidden_size": 64,
    "intermediate_size": 96,
    "vocab_size": 300,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
# Every supported type appears; rows are 64 or 96 wide (multiples of the 32-wide blocks).
KINDS = {
    "model.embed_tokens.weight": "Q8_0",
    "model.layers.0.self_attn.q_proj.weight": "Q4_0",
    "model.layers.0.self_attn.k_proj.weight": "Q4_1",
    "model.layers.0.self_attn.v_proj.weight": "F16",
    "model.layers.0.self_attn.o_proj.weight": "BF16",
    "model.layers.0.mlp.gate_proj.weight": "Q5_0",  # through the gguf package's dequantizer
    "model.layers.1.self_attn.q_proj.weight": "Q4_1",
    "model.layers.1.self_attn.k_proj.weight": "Q4_0",
    "model.layers.1.mlp.down_proj.weight": "Q8_0",
    "model.layers.1.mlp.up_proj.weight": "Q4_1",
}
TEXTS = [
    "Once upon a time",
    "def attention(query, key):\n    return 42 * 7",
    "Héllo wörld 🙂 日本語",
    "    whitespace    runs\t\tand\n\nnewlines",
    "<|im_start|>user\nhi<|im_end|>\n",
    "12345 and 3.14",
]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tiny_tokenizer.write_tokenizer(root / "tok")
    tokenizer_json = gguf_files.load_tokenizer_json(root / "tok")
    weights = checkpoints.random_weights(CONFIG, seed=5)
    held = gguf_files.write_gguf(
        root / "tiny.gguf",
        CONFIG,
        weights,
        KINDS,
        tokenizer_json,
        chat_template=tiny_tokenizer.CHAT_TEMPLATE,
    )
    return root, held, tokenizer_json


def test_every_tensor_type_dequantizes_and_unpermutes(tiny_gguf):
    root, held, _ = tiny_gguf
    checkpoint = GGUFCheckpoint(root / "tiny.gguf")
    kinds = {t.kind for t in checkpoint.tensors.values()}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"} <= kinds
    assert set(checkpoint.tensors) == set(held)
    for name, expected in held.items():
        assert_close(checkpoint.load(name), expected.astype(np.float64), 1e-6, name)


def test_config_comes_from_metadata(tiny_gguf):
    root, _, _ = tiny_gguf
    config = GGUFCheckpoint(root / "tiny.gguf").config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rope_theta",
        "max_position_embeddings",
    ):
        assert config[key] == CONFIG[key], key
    assert config["tie_word_embeddings"] is True


def test_export_matches_numpy_forward_of_the_held_weights(tiny_gguf, tmp_path):
    root, held, _ = tiny_gguf
    export(root / "tiny.gguf", tmp_path / "onnx", last_logits_only=False)
    ids = np.array([[5, 17, 42, 8, 99, 3]])
    mask = np.ones_like(ids)
    logits, _ = Decoder(tmp_path / "onnx")(ids, mask)
    expected, _ = numpy_forward.forward(held, CONFIG, ids, mask, positions_for(mask, 6))
    assert_close(logits, expected, 1e-4, "logits")


def test_tokenizer_round_trips_and_matches_the_vocabulary(tiny_gguf, tmp_path):
    root, _, tokenizer_json = tiny_gguf
    export(root / "tiny.gguf", tmp_path / "onnx")
    ours = Tokenizer(tmp_path / "onnx")
    tokens, merges, types = gguf_files.tokenizer_metadata(tokenizer_json)
    specials = [t for t, kind in zip(tokens, types) if kind == 3]
    reference = bpe_reference.ByteBPE(tokens, merges, specials, pre="gpt2")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    chat = ours.chat([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_convert_writes_the_hf_layout(tiny_gguf, tmp_path):
    root, held, _ = tiny_gguf
    paths = convert(root / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in paths) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(tensors) == set(held)
    for name, expected in held.items():
        assert_close(tensors[name], expected.astype(np.float64), 1e-6, name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    export(tmp_path / "hf", tmp_path / "onnx", last_logits_only=False)  # we read what we write
    ids = np.array([[5, 6, 7]])
    logits, _ = Decoder(tmp_path / "onnx")(ids, np.ones_like(ids))
    expected, _ = numpy_forward.forward(
        held, CONFIG, ids, np.ones_like(ids), positions_for(np.ones_like(ids), 3)
    )
    assert_close(logits, expected, 1e-4, "logits after convert")


def test_generation_from_gguf_export(tiny_gguf, tmp_path):
    root, _, _ = tiny_gguf
    export(root / "tiny.gguf", tmp_path / "onnx")
    result = Generator(tmp_path / "onnx", provider="cpu").generate(
        "Once upon", max_new_tokens=5, use_eos=False
    )
    assert len(result.token_ids) == 5 and isinstance(result.text, str)


def damaged(root, tmp_path, how):
    data = (root / "tiny.gguf").read_bytes()
    path = tmp_path / "bad.gguf"
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        path.write_bytes(b"GGUF" + b"\xff" * 60 + data[64:])
    elif how == "not-gguf":
        path.write_bytes(b"hello, not a model at all")
    return path


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncated", "not a readable GGUF file"),
        ("corrupt", "not a readable GGUF file"),
        ("not-gguf", "not a readable GGUF file"),
    ],
)
def test_damaged_gguf_is_rejected(tiny_gguf, tmp_path, how, message):
    root, _, _ = tiny_gguf
    path = damaged(root, tmp_path, how)
    with pytest.raises(CheckpointError, match=message):
        export(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    done = subprocess.run(
        [sys.executable, "-m", "graphattn", "export", str(path), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert message in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_unsupported_architecture_and_tensor_type(tmp_path):
    weights = checkpoints.random_weights(CONFIG, seed=1)
    gguf_files.write_gguf(tmp_path / "falcon.gguf", CONFIG, weights, {}, arch="falcon")
    with pytest.raises(CheckpointError, match="GGUF architecture 'falcon' is not supported"):
        GGUFCheckpoint(tmp_path / "falcon.gguf")
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    for key, value in (
        ("block_count", 1),
        ("embedding_length", 64),
        ("feed_forward_length", 96),
        ("head_count", 4),
        ("vocab_size", 300),
    ):
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor(
        "token_embd.weight", np.zeros((300, 80), np.uint8), raw_dtype=GGMLQuantizationType.Q8_1
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    checkpoint = GGUFCheckpoint(tmp_path / "odd.gguf")
    with pytest.raises(CheckpointError, match=re.escape("'token_embd.weight': tensor type Q8_1")):
        checkpoint.load("model.embed_tokens.weight")


def test_parser_agrees_with_the_gguf_package(tiny_gguf):
    """Our GGUF parser reads the same metadata and tensor bytes as gguf.GGUFReader."""
    from gguf import GGUFReader

    from graphattn.exporters.gguf_format import read_gguf

    root, _, _ = tiny_gguf
    ours = read_gguf(root / "tiny.gguf")
    theirs = GGUFReader(str(root / "tiny.gguf"))
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            expected = field.contents()
            got = ours.fields[key]
            assert got == pytest.approx(expected) if isinstance(got, float) else got == expected, (
                key
            )
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for info, tensor in zip(ours.tensors, theirs.tensors):
        assert info.kind == tensor.tensor_type.name
        mine = np.asarray(ours.array(info)).reshape(-1).view(np.uint8)
        assert np.array_equal(mine, np.asarray(tensor.data).reshape(-1).view(np.uint8)), info.name
