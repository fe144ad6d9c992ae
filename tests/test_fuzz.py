"""Fuzzing the readers of untrusted input (targets in fuzz_targets.py, engine scripts/fuzz.py).

- The harness itself: each rule (allowed error, one-line message, time, memory, bounds) fails
  when broken.
- Regression inputs for every bug the fuzzer (or the probing around it) found and we fixed,
  small and built here, plus the fuzzer's own inputs kept under tests/data/fuzz/.
- The findings it reported in the GGUF reader, the tokenizer builder and the config mapping
  (models/), fixed since, kept as tests.
- A bounded, seeded run of every target, as CI runs it (about 40 s in all): no findings.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf extra is not installed (seeds are written with it)")

import fuzz_targets  # noqa: E402
from fuzz_targets import TARGETS, Finding, Scratch, Target, check  # noqa: E402

from graphattn.exporters.checkpoint import open_checkpoint  # noqa: E402
from graphattn.exporters.gguf_format import GGUFFormatError, read_gguf  # noqa: E402
from graphattn.exporters.safetensors_reader import (  # noqa: E402
    CheckpointError,
    load_float32,
    read_header,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "fuzz"


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    return Scratch(tmp_path / "scratch")


def passes(target: str, data: bytes, scratch: Scratch) -> None:
    """``data`` loads or fails properly under every rule of ``target``."""
    finding = check(TARGETS[target], data, scratch)
    assert finding is None, finding and {**finding.to_json(), "input_hex": "..."}


# ---------------------------------------------------------------------------------------------
# the harness fails when a rule is broken


def _target(execute, allowed=(ValueError,), constant: int = 1 << 20) -> Target:
    return Target("test", execute, allowed, lambda d: [], lambda *a: b"", 1, constant)


def _raise_type_error(data: bytes, scratch: Scratch) -> None:
    raise TypeError("an unexpected type")


def _raise_two_lines(data: bytes, scratch: Scratch) -> None:
    raise ValueError("first line\nsecond line")


def _allocate(data: bytes, scratch: Scratch) -> None:
    np.ones(10 << 20, dtype=np.uint8)


def _spin(data: bytes, scratch: Scratch) -> None:
    while True:
        pass


def _outside(data: bytes, scratch: Scratch) -> None:
    fuzz_targets._inside("t", offset=len(data) - 2, nbytes=4, size=len(data))


def _fine(data: bytes, scratch: Scratch) -> None:
    if data:
        raise ValueError("refused, on one line")


@pytest.mark.parametrize(
    ("execute", "kind"),
    [
        (_raise_type_error, "exception"),
        (_raise_two_lines, "message"),
        (_allocate, "memory"),
        (_spin, "timeout"),
        (_outside, "bounds"),
    ],
)
def test_the_harness_reports_each_broken_rule(execute, kind: str, scratch: Scratch) -> None:
    start = time.perf_counter()
    finding = check(_target(execute), b"0123456789", scratch, time_limit=0.3)
    assert isinstance(finding, Finding)
    assert finding.kind == kind
    assert time.perf_counter() - start < 5
    if kind == "exception":
        assert (
            finding.where.startswith("tests/test_fuzz.py:") and "_raise_type_error" in finding.where
        )


def test_the_harness_passes_a_proper_failure_and_a_load(scratch: Scratch) -> None:
    assert check(_target(_fine), b"x", scratch) is None
    assert check(_target(_fine), b"", scratch) is None


def test_config_inputs_are_decisions_on_a_base_config() -> None:
    assert json.loads(fuzz_targets.config_json(b"")) == fuzz_targets.CONFIG_BASES[0]
    edited = json.loads(fuzz_targets.config_json(bytes([0, 1, 10, 0, 4, 0])))
    assert edited != fuzz_targets.CONFIG_BASES[0]
    assert fuzz_targets.config_json(b"\x07\x03abc") == fuzz_targets.config_json(b"\x07\x03abc")


# ---------------------------------------------------------------------------------------------
# GGUF regressions (exporters/gguf_format.py)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf(fields: bytes = b"", n_fields: int = 0, tensors=(), data: bytes = b"") -> bytes:
    """A GGUF v3 file: ``fields`` (encoded key/values), ``tensors`` as (name, sizes innermost
    first, ggml type, offset), then ``data`` at the default alignment of 32."""
    directory = b"".join(
        _string(name)
        + struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes)
        + struct.pack("<IQ", kind, offset)
        for name, sizes, kind, offset in tensors
    )
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), n_fields) + fields + directory
    return head + b"\0" * (-len(head) % 32) + data


def _u32_field(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", 4, value)


F32, Q8_0 = 0, 8


def _gguf_error(data: bytes, scratch: Scratch, match: str) -> None:
    passes("gguf", data, scratch)
    with pytest.raises(GGUFFormatError, match=match):
        parsed = read_gguf(scratch.input_file(data, ".gguf"))
        for info in parsed.tensors:
            parsed.array(info)


def test_gguf_nested_metadata_arrays_are_refused_not_recursed(scratch: Scratch) -> None:
    # was RecursionError: 5,000 arrays of one array each, 12 bytes apiece
    nested = _string("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000
    _gguf_error(_gguf(nested + struct.pack("<IQ", 0, 0), 1), scratch, "nested more than 8")


@pytest.mark.parametrize(
    "alignment",
    [
        _u32_field("general.alignment", 0),  # was ZeroDivisionError
        _u32_field("general.alignment", 24),
        _string("general.alignment") + struct.pack("<I", 8) + _string("x"),  # was ValueError
        _string("general.alignment") + struct.pack("<If", 6, 0.5),  # int(0.5) == 0
    ],
    ids=["zero", "not-a-power-of-two", "string", "float"],
)
def test_gguf_alignment_must_be_a_power_of_two(alignment: bytes, scratch: Scratch) -> None:
    _gguf_error(_gguf(alignment, 1), scratch, "general.alignment")


def test_gguf_element_count_does_not_wrap_around(scratch: Scratch) -> None:
    # (2**62 + 1) * 4 wrapped to 4 in int64: a 16-byte tensor of shape (4, 2**62 + 1)
    wrapped = _gguf(tensors=[("w", (2**62 + 1, 4), F32, 0)], data=b"\0" * 16)
    _gguf_error(wrapped, scratch, "too many elements")
    # 2**32 * 2**32 wrapped to 0: an "empty" tensor that no array can have
    _gguf_error(_gguf(tensors=[("w", (2**32, 2**32), F32, 0)]), scratch, "too many elements")


def test_gguf_empty_tensor_gives_an_empty_array(scratch: Scratch) -> None:
    data = _gguf(tensors=[("e", (4, 0), F32, 0), ("q", (32, 0), Q8_0, 0)])
    passes("gguf", data, scratch)
    parsed = read_gguf(scratch.input_file(data, ".gguf"))  # was ValueError from reshape
    assert parsed.array(parsed.tensors[0]).shape == (0, 4)
    assert parsed.array(parsed.tensors[1]).shape == (0, 34)


def test_gguf_unknown_type_refuses_its_array(scratch: Scratch) -> None:
    data = _gguf(tensors=[("u", (4,), 77, 0)], data=b"\0" * 8)
    passes("gguf", data, scratch)
    parsed = read_gguf(scratch.input_file(data, ".gguf"))
    assert parsed.tensors[0].kind == "type#77"
    with pytest.raises(GGUFFormatError, match="block size is unknown"):  # was mmap's ValueError
        parsed.array(parsed.tensors[0])
    # and its data must at least start inside the file
    _gguf_error(_gguf(tensors=[("u", (4,), 77, 10**6)]), scratch, "does not fit the file")


def test_gguf_block_rows_must_be_whole_blocks(scratch: Scratch) -> None:
    # 2 rows of 48: 96 elements are 3 Q8_0 blocks, but no row is whole blocks
    data = _gguf(tensors=[("q", (48, 2), Q8_0, 0)], data=b"\0" * 3 * 34)
    _gguf_error(data, scratch, "not whole Q8_0 blocks")


def test_gguf_array_count_is_checked_against_the_bytes_left(scratch: Scratch) -> None:
    field = _string("k") + struct.pack("<IIQ", 9, 0, 100)  # 100 uint8 in 20 (+ padding)
    _gguf_error(_gguf(field + b"\0" * 20, 1), scratch, "larger than the file")


def test_gguf_array_refuses_data_of_a_file_that_shrank(tmp_path: Path) -> None:
    path = tmp_path / "t.gguf"
    path.write_bytes(_gguf(tensors=[("w", (4,), F32, 0)], data=b"\0" * 16))
    parsed = read_gguf(path)
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(GGUFFormatError, match="outside the file"):
        parsed.array(parsed.tensors[0])


def test_gguf_header_claiming_2_60_bytes_raises_without_allocating(scratch: Scratch) -> None:
    data = _gguf(tensors=[("w", (2**30, 2**28), F32, 0)])
    _gguf_error(data, scratch, "does not fit the file")
    finding = check(TARGETS["gguf"], data, scratch)
    assert finding is None  # and its peak stayed within 64 × 100 bytes + 1 MiB


# ---------------------------------------------------------------------------------------------
# safetensors regressions (exporters/safetensors_reader.py)


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype: object = "F32", shape: object = (1,), offsets: object = (0, 4)) -> dict:
    shape = list(shape) if isinstance(shape, tuple) else shape
    offsets = list(offsets) if isinstance(offsets, tuple) else offsets
    return {"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


@pytest.mark.parametrize(
    "data",
    [
        _safetensors(b"[" * 100_000 + b"]" * 100_000),  # was RecursionError
        _safetensors(b'{"t": ' + b"1" * 5000 + b"}"),  # was ValueError (4,300-digit limit)
        _safetensors(_entry(dtype=["F32"]), b"\0" * 4),  # was TypeError (unhashable)
        _safetensors(b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'),
        _safetensors(_entry(shape=(2.5,)), b"\0" * 8),
        _safetensors(_entry(shape=("1",)), b"\0" * 4),  # was TypeError
        _safetensors(_entry(shape=(-1, -1)), b"\0" * 4),  # was ValueError from memmap
        _safetensors(_entry(shape=(True, 1)), b"\0" * 4),
        _safetensors(_entry(shape=(2**70,)), b"\0" * 4),  # was OverflowError
        _safetensors(_entry(shape=(2**32, 2**32), offsets=(0, 0))),  # wrapped to 0: ValueError
        _safetensors(_entry(shape=(2**62 + 1, 4), offsets=(0, 16)), b"\0" * 16),  # wrapped to 4
        _safetensors(_entry(shape=(0, 2**62, 2**62), offsets=(0, 0))),
        _safetensors(_entry(shape=(1,) * 33), b"\0" * 4),
        _safetensors(_entry(offsets=(0.5, 4.5)), b"\0" * 8),  # was TypeError
        _safetensors(_entry(offsets={"a": 1}), b"\0" * 4),
        _safetensors(_entry(offsets=(0, 4, 8)), b"\0" * 8),
        _safetensors(_entry(offsets=(-4, 0)), b"\0" * 4),
        _safetensors(_entry(offsets=(0, None)), b"\0" * 4),
        _safetensors({"t": ["F32", [1], [0, 4]]}, b"\0" * 4),
    ],
    ids=lambda data: data[8:60].decode(errors="replace"),
)
def test_safetensors_bad_headers_raise_checkpoint_error(data: bytes, scratch: Scratch) -> None:
    passes("safetensors", data, scratch)
    with pytest.raises(CheckpointError):
        for entry in read_header(scratch.input_file(data, ".safetensors")).values():
            load_float32(entry)


def test_safetensors_header_claiming_2_60_bytes_raises_without_allocating(
    scratch: Scratch,
) -> None:
    data = _safetensors(_entry(shape=(2**30, 2**28), offsets=(0, 2**60)))
    passes("safetensors", data, scratch)
    with pytest.raises(CheckpointError, match="does not fit"):
        read_header(scratch.input_file(data, ".safetensors"))


def test_safetensors_load_refuses_data_of_a_file_that_shrank(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(_safetensors(_entry(shape=(4,), offsets=(0, 16)), b"\0" * 16))
    entry = read_header(path)["t"]
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(CheckpointError, match="outside the file"):
        load_float32(entry)


@pytest.mark.parametrize(
    "text",
    [b'{"a": ' + b"[" * 100_000, b'{"a": ' + b"7" * 5000 + b"}", b'{"a": "\xff"}'],
    ids=["deep", "5000-digits", "bad-utf8"],
)
def test_config_json_that_does_not_decode_raises_checkpoint_error(
    text: bytes, tmp_path: Path
) -> None:
    fuzz_targets.checkpoints.write_checkpoint(tmp_path, fuzz_targets.CONFIG_BASES[0])
    (tmp_path / "config.json").write_bytes(text)  # was RecursionError / ValueError
    with pytest.raises(CheckpointError, match="cannot read JSON"):
        open_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# the fuzzer's own inputs, kept


@pytest.mark.parametrize(
    "path",
    sorted(DATA.glob("gguf/*.bin")) + sorted(DATA.glob("safetensors/*.bin")),
    ids=lambda path: f"{path.parent.name}/{path.name}",
)
def test_saved_fuzzer_inputs_pass(path: Path, scratch: Scratch) -> None:
    passes(path.parent.name, path.read_bytes(), scratch)


@pytest.mark.parametrize("path", sorted(DATA.glob("checkpoint/*.json")), ids=lambda p: p.name)
def test_saved_config_texts_raise_checkpoint_error(path: Path, scratch: Scratch) -> None:
    assert check(fuzz_targets.CONFIG_TEXT, path.read_bytes(), scratch) is None
    directory = scratch.root / "checkpoint"
    with pytest.raises(CheckpointError):
        open_checkpoint(directory)


# ---------------------------------------------------------------------------------------------
# findings the fuzzer reported in the GGUF reader, tokenizer and config mapping, fixed since


def _patched_u32(data: bytes, key: str, value: int) -> bytes:
    """``data`` with the uint32 metadata value of ``key`` replaced."""
    at = data.index(_string(key)) + len(_string(key))
    assert struct.unpack_from("<I", data, at)[0] == 4, f"{key} is not a uint32"
    return data[: at + 4] + struct.pack("<I", value) + data[at + 8 :]


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return fuzz_targets.gguf_seeds(tmp_path_factory.mktemp("seeds"))[0]


def test_the_tiny_llama_gguf_passes_as_a_checkpoint(llama_gguf: bytes, scratch: Scratch) -> None:
    passes("gguf-checkpoint", llama_gguf, scratch)


GGUF_READER_FINDINGS = {
    # ZeroDivisionError in GGUFCheckpoint._config: hidden // heads
    "head-count-0": ("llama.attention.head_count", 0),
    # ValueError (not CheckpointError) from unpermute_rows in load: 32 q rows, 3 heads
    "head-count-3": ("llama.attention.head_count", 3),
    "head-count-kv-3": ("llama.attention.head_count_kv", 3),
}


@pytest.mark.parametrize("case", sorted(GGUF_READER_FINDINGS))
def test_gguf_checkpoint_finding(case: str, llama_gguf: bytes, scratch: Scratch) -> None:
    key, value = GGUF_READER_FINDINGS[case]
    passes("gguf-checkpoint", _patched_u32(llama_gguf, key, value), scratch)


def test_gguf_tokenizer_finding(tmp_path: Path, scratch: Scratch) -> None:
    # a merge of a token that is not in the vocabulary: tokenizers raises a bare Exception
    # ("Error while initializing BPE: Token `!` out of vocabulary"), not a ValueError
    import gguf_files

    tokenizer = json.loads(json.dumps(fuzz_targets.SEED_TOKENIZER))
    tokenizer["model"]["merges"].append("a !")
    config = fuzz_targets.SEED_LLAMA
    weights = fuzz_targets.checkpoints.random_weights(config, seed=1)
    path = tmp_path / "t.gguf"
    gguf_files.write_gguf(path, config, weights, fuzz_targets.SEED_KINDS, tokenizer)
    passes("gguf-checkpoint", path.read_bytes(), scratch)


_LLAMA, _GPT2 = fuzz_targets.checkpoints.LLAMA, fuzz_targets.checkpoints.GPT2
CONFIG_FINDINGS = {  # models/: config edits that escaped as other than ValueError
    "model_type-list": {**_LLAMA, "model_type": ["llama"]},  # TypeError: unhashable
    "architectures-int": {**_GPT2, "architectures": 32},  # TypeError: not iterable
    "n_head-0": {**_GPT2, "n_head": 0},  # ZeroDivisionError
    "num_attention_heads-0": {**_LLAMA, "num_attention_heads": 0},  # ZeroDivisionError
    "intermediate_size-inf": {**_LLAMA, "intermediate_size": math.inf},  # OverflowError
    "vocab_size-minus-inf": {**_LLAMA, "vocab_size": -math.inf},  # OverflowError
    "rope_theta-dict": {**_LLAMA, "rope_theta": {}},  # TypeError in float()
    "partial_rotary_factor-list": {**_LLAMA, "partial_rotary_factor": []},  # TypeError
    "rope_theta-10**400": {**_LLAMA, "rope_theta": 10**400},  # OverflowError int → float
    "num_hidden_layers-2**100": {**_LLAMA, "num_hidden_layers": 2**100},  # OverflowError
    "num_hidden_layers-2**63-1": {**_LLAMA, "num_hidden_layers": 2**63 - 1},  # MemoryError
    "num_hidden_layers-10**7": {**_LLAMA, "num_hidden_layers": 10**7},  # > 2 s, > 64 MiB
}


@pytest.mark.parametrize("case", sorted(CONFIG_FINDINGS))
def test_config_mapping_finding(case: str, scratch: Scratch) -> None:
    text = json.dumps(CONFIG_FINDINGS[case]).encode()
    finding = check(fuzz_targets.CONFIG_TEXT, text, scratch)
    assert finding is None, finding and {**finding.to_json(), "input_hex": "..."}


# ---------------------------------------------------------------------------------------------
# the bounded run, as CI runs it

BOUNDED_RUNS = {"gguf": 2000, "gguf-checkpoint": 1500, "safetensors": 3000, "config": 300}


def _bounded_run(target: str, tmp_path: Path) -> dict:
    out = tmp_path / "summary.json"
    command = [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--target", target]
    command += ["--runs", str(BOUNDED_RUNS[target]), "--seconds", "10", "--seed", "0"]
    command += ["--json", str(out), "--workdir", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.is_file(), result.stdout + result.stderr
    (summary,) = json.loads(out.read_text())
    print(result.stdout)
    assert summary["inputs"] > 0, (tmp_path / "work" / target / "worker.log").read_text()[-3000:]
    return summary


@pytest.mark.parametrize("target", ["gguf", "safetensors", "gguf-checkpoint", "config"])
def test_bounded_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    summary = _bounded_run(target, tmp_path)
    findings = [
        {key: record.get(key) for key in ("kind", "error", "where", "message")}
        for record in summary["findings"]
    ]
    assert findings == []


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", 7, ""])
def test_an_index_naming_a_shard_outside_the_directory_is_refused(shard, tmp_path: Path) -> None:
    from graphattn.exporters.checkpoint import open_checkpoint
    from graphattn.exporters.safetensors_reader import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps(fuzz_targets.checkpoints.LLAMA))
    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(tmp_path)
