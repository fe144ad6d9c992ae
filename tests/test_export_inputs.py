"""Checkpoint formats, determinism, fp16 output, the CLI, and bad input (clear error, non-zero
exit, no output directory left behind)."""

import json
import re
import subprocess
import sys

import checkpoints
import numpy as np
import numpy_forward
import pytest
from decoder_runner import Decoder, positions_for
from harness import assert_close
from safetensors.numpy import save_file

from graphattn import export
from graphattn.exporters.safetensors_reader import CheckpointError


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "graphattn", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("dtype,shards", [("F16", 1), ("BF16", 1), ("F32", 3)])
def test_checkpoint_dtypes_and_shards(tmp_path, dtype, shards):
    config = checkpoints.LLAMA
    weights = checkpoints.write_checkpoint(tmp_path / "hf", config, dtype=dtype, shards=shards)
    export(tmp_path / "hf", tmp_path / "onnx", last_logits_only=False)
    ids = np.array([[5, 6, 7, 8]])
    mask = np.ones_like(ids)
    logits, _ = Decoder(tmp_path / "onnx")(ids, mask)
    expected, _ = numpy_forward.forward(weights, config, ids, mask, positions_for(mask, 4))
    assert_close(logits, expected, 1e-4, f"{dtype} x{shards} logits")


def test_reader_agrees_with_the_safetensors_package(tmp_path):
    """A file written by the safetensors package itself (not our test writer) exports too."""
    config = checkpoints.GPT2
    weights = checkpoints.random_weights(config, seed=4)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    export(tmp_path / "hf", tmp_path / "onnx", last_logits_only=False)
    ids = np.array([[3, 9, 4]])
    mask = np.ones_like(ids)
    logits, _ = Decoder(tmp_path / "onnx")(ids, mask)
    expected, _ = numpy_forward.forward(weights, config, ids, mask, positions_for(mask, 3))
    assert_close(logits, expected, 1e-4, "logits")


def test_export_is_deterministic(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.GPT2)
    (tmp_path / "hf" / "tokenizer.json").write_text('{"model": {}}')
    first = export(tmp_path / "hf", tmp_path / "a")
    second = export(tmp_path / "hf", tmp_path / "b")
    assert [p.name for p in first.paths] == [p.name for p in second.paths]
    assert "tokenizer.json" in [p.name for p in first.paths]
    for a, b in zip(first.paths, second.paths):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_fp16_export_tracks_fp32(tmp_path):
    config = checkpoints.LLAMA
    checkpoints.write_checkpoint(tmp_path / "hf", config)
    export(tmp_path / "hf", tmp_path / "fp32", last_logits_only=False)
    export(tmp_path / "hf", tmp_path / "fp16", precision="fp16", last_logits_only=False)
    ids = np.array([[5, 6, 7, 8, 9]])
    mask = np.ones_like(ids)
    logits32, _ = Decoder(tmp_path / "fp32")(ids, mask)
    decoder16 = Decoder(tmp_path / "fp16")
    assert decoder16.dtype == np.float16
    logits16, presents16 = decoder16(ids, mask)
    assert logits16.dtype == np.float16 and presents16[0][0].dtype == np.float16
    # fp16 weights and activations: documented tolerance 2e-2 on these O(1) logits
    assert_close(logits16.astype(np.float32), logits32.astype(np.float64), 2e-2, "fp16 logits")
    assert (logits16.argmax(-1) == logits32.argmax(-1)).all()


def test_reexport_replaces_a_previous_export(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.GPT2)
    export(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("old")
    export(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_cli_export_and_inspect(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.GPT2)
    done = cli("export", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--progress")
    assert done.returncode == 0, done.stderr
    assert "exported gpt2: 2 layers" in done.stdout
    assert "tensors" in done.stderr  # the progress bar
    shown = cli("inspect", str(tmp_path / "out"))
    assert shown.returncode == 0, shown.stderr
    assert "architecture: gpt2  layers=2" in shown.stdout
    assert "past_key_values.{i}.key: float[batch_size, 4, past_sequence_length, 8]" in shown.stdout
    assert "model.onnx.data" in shown.stdout
    assert "target=ort  precision=fp32" in shown.stdout  # the default target
    assert "kv_buffer" not in shown.stdout  # head_dim 8: no GroupQueryAttention


def corrupt_header(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:8] + b"{not json" + path.read_bytes()[17:])


def truncate_data(directory):
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def drop_tensor(directory):
    weights = checkpoints.random_weights(checkpoints.GPT2)
    del weights["transformer.h.1.mlp.c_fc.bias"]
    checkpoints.write_safetensors(directory / "model.safetensors", weights)


def add_tensor(directory):
    weights = checkpoints.random_weights(checkpoints.GPT2)
    weights["transformer.h.0.attn.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    checkpoints.write_safetensors(directory / "model.safetensors", weights)


def change_config(**changes):
    def apply(directory):
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))

    return apply


def pickle_only(directory):
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 pickle that must never be loaded")


def no_config(directory):
    (directory / "config.json").unlink()


BAD_INPUTS = {
    "corrupt-header": (corrupt_header, "corrupt safetensors header"),
    "truncated-data": (truncate_data, "does not fit"),
    "missing-tensor": (drop_tensor, "missing tensor 'transformer.h.1.mlp.c_fc.bias'"),
    "unexpected-tensor": (
        add_tensor,
        "unexpected tensors 'transformer.h.0.attn.extra_proj.weight'",
    ),
    "shape-mismatch": (change_config(n_embd=48), "has shape [96, 32], config implies [96, 48]"),
    "unsupported-type": (
        change_config(model_type="whisper"),
        "model_type 'whisper' is not supported",
    ),
    "unsupported-arch": (
        change_config(architectures=["GPT2ForQuestionAnswering"]),
        "architectures",
    ),
    "pickle": (pickle_only, "pytorch_model.bin: pickle checkpoints are refused"),
    "no-config": (no_config, "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_reported_and_leaves_nothing(tmp_path, case):
    damage, message = BAD_INPUTS[case]
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.GPT2)
    damage(tmp_path / "hf")
    with pytest.raises((CheckpointError, ValueError, KeyError), match=re.escape(message)):
        export(tmp_path / "hf", tmp_path / "out")
    done = cli("export", str(tmp_path / "hf"), "-o", str(tmp_path / "out"))
    assert done.returncode != 0
    assert done.stderr.startswith("graphattn: error:") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no staging dir


def test_pickle_is_never_opened(tmp_path, monkeypatch):
    import pickle

    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.GPT2)
    pickle_only(tmp_path / "hf")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CheckpointError):
        export(tmp_path / "hf", tmp_path / "out")


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.GPT2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a graphattn output"):
        export(tmp_path / "hf", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
