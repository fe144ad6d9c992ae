"""``--ort-version``: the lowering uses only what the stated onnxruntime accepts, the export
records the oldest onnxruntime that runs it, and our runtime refuses, in one line, an export
that needs a newer onnxruntime than the installed one. The second venv ``.venv-ort130``
(``scripts/setup_ort130.sh``, run by the test command) holds onnxruntime 1.30.0, the newest
on npm: there the default export runs and equals the functions graph."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import checkpoints
import numpy as np
import onnx
import pytest
from old_runtime import needs_old_venv, old_greedy, refusal_line

from graphattn import export
from graphattn.compiler import CompileOptions
from graphattn.inspect import describe
from graphattn.runtime import Generator, ModelLoadError, ModelSession
from graphattn.runtime.model_metadata import read_metadata, version_tuple
from graphattn.runtime.session import check_onnxruntime

ROOT = Path(__file__).resolve().parents[1]
WIDE = checkpoints.llama_variant(hidden_size=64, intermediate_size=96, max_position_embeddings=48)
PROMPTS = [[5, 17, 42, 8, 11, 60, 3], [40, 41], [7, 3, 90, 12]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-version")
    checkpoints.write_checkpoint(root / "hf", WIDE, seed=5)
    export(root / "hf", root / "functions", target="functions")
    export(root / "hf", root / "portable", target="portable")
    export(root / "hf", root / "ort130", target="ort")  # the default version
    export(root / "hf", root / "ort132", target="ort", ort_version="1.32")
    export(root / "hf", root / "int4-130", target="ort", precision="int4")
    return root


def gqa_nodes(out_dir):
    graph = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph
    return [n for n in graph.node if n.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize(
    "text, expected", [("1.30", "1.30"), ("1.32", "1.32"), ("1.31.2", "1.31"), (" 2.0 ", "2.0")]
)
def test_versions_are_normalised(text, expected):
    assert CompileOptions("ort", ort_version=text).ort_version == expected


@pytest.mark.parametrize("text", ["1.29", "1", "latest", "1.x", "0.99"])
def test_bad_or_too_old_versions_are_refused(text):
    with pytest.raises(ValueError, match="ort_version"):
        CompileOptions("ort", ort_version=text)


def test_default_lowering_fits_onnxruntime_1_30(exports):
    nodes = gqa_nodes(exports / "ort130")
    assert len(nodes) == 2
    # 1.30's GroupQueryAttention takes at most 16 inputs; query_seqlens (17th) is 1.32+
    assert all(len(n.input) <= 16 for n in nodes)
    newer = gqa_nodes(exports / "ort132")
    assert all(len(n.input) == 17 and n.input[16] for n in newer)


@pytest.mark.parametrize(
    "name, needed, continuation",
    [
        ("functions", "1.30", None),
        ("portable", "1.30", None),
        ("ort130", "1.30", "one_token"),
        ("ort132", "1.32", None),
        ("int4-130", "1.30", "one_token"),
    ],
)
def test_export_records_its_oldest_onnxruntime(exports, name, needed, continuation):
    model = onnx.load(str(exports / name / "model.onnx"), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata.get("graphattn.min_onnxruntime") == needed
    assert metadata.get("graphattn.batched_continuation") == continuation
    # the runtime's wire-level reader sees exactly what onnx parses
    assert read_metadata(exports / name / "model.onnx") == metadata
    if needed:
        assert f"min_onnxruntime={needed}" in describe(exports / name)


@pytest.mark.parametrize("name", ["portable", "ort130", "ort132"])
def test_genai_config_records_the_version_where_genai_accepts_it(exports, name):
    config = json.loads((exports / name / "genai_config.json").read_text())
    metadata = read_metadata(exports / name / "model.onnx")
    assert config["graphattn.min_onnxruntime"] == metadata["graphattn.min_onnxruntime"]
    assert set(config) == {"model", "search", "graphattn.min_onnxruntime"}


@pytest.mark.parametrize("level, accepted", [("top", True), ("model", False), ("decoder", False)])
def test_genai_takes_an_unknown_string_key_only_at_the_top(exports, tmp_path, level, accepted):
    """Why the key sits at the top level: ONNX Runtime GenAI refuses unknown keys inside
    ``model`` and ``decoder`` (and ``search``), and ignores unknown strings at the top."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra")
    out = tmp_path / "ort"
    shutil.copytree(exports / "ort130", out)
    og.Model(str(out))  # as exported, with graphattn.min_onnxruntime at the top: loads
    config = json.loads((out / "genai_config.json").read_text())
    where = {"top": config, "model": config["model"], "decoder": config["model"]["decoder"]}
    where[level]["another_key"] = "1.30"
    (out / "genai_config.json").write_text(json.dumps(config))
    if accepted:
        og.Model(str(out))
    else:
        with pytest.raises(RuntimeError, match='Unknown value "another_key"'):
            og.Model(str(out))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.30.0", (1, 30, 0)),
        ("1.32.1+cu12", (1, 32, 1)),
        ("1.33.0.dev20261101", (1, 33, 0)),
        ("1.32.0rc1", (1, 32, 0)),
        ("1.32.0-rc1", (1, 32, 0)),
    ],
)
def test_installed_versions_parse(text, expected):
    assert version_tuple(text) == expected


def test_runtime_refuses_an_export_for_a_newer_onnxruntime(exports):
    model = exports / "ort132" / "model.onnx"
    with pytest.raises(ModelLoadError, match=r"needs onnxruntime >= 1\.32, but 1\.30\.0") as info:
        check_onnxruntime(model, installed="1.30.0")
    assert "--ort-version 1.30" in str(info.value) and "\n" not in str(info.value)
    check_onnxruntime(model, installed="1.32.0")  # new enough: no error
    check_onnxruntime(exports / "ort130" / "model.onnx", installed="1.30.0")


def test_one_token_continuation_is_exact_in_every_cache(exports):
    """A batch continuing with several tokens after a past: the 1.30 graph cannot take it in
    one call, so the caches feed it token by token; logits equal the 1.32 graph's one call."""
    ids = np.array([[0] * (7 - len(r)) + r for r in PROMPTS])
    mask = (np.arange(7)[None] >= (7 - np.array([len(r) for r in PROMPTS]))[:, None]).astype(
        np.int64
    )
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) * mask
    results = {}
    for name in ("ort130", "ort132"):
        session = ModelSession(exports / name, provider="cpu")
        assert session.one_token_continuation == (name == "ort130")
        for cache_name in ("shared", "bound", "plain"):
            cache = Generator(session, cache=cache_name, max_length=16).cache
            cache.reset(3)
            # the GQA graphs of RoPE models have no position_ids input: callers may pass None
            rows = positions if session.has_position_ids else None
            cache.step(ids[:, :4], mask[:, :4], None if rows is None else rows[:, :4])
            last = cache.step(ids[:, 4:], mask, None if rows is None else rows[:, 4:])
            results[name, cache_name] = last[:, -1]
            assert cache.length == 7
    for key, logits in results.items():
        np.testing.assert_allclose(logits, results["ort132", "plain"], atol=1e-4, err_msg=str(key))


@needs_old_venv
@pytest.mark.parametrize("cache", ["auto", "plain"])
@pytest.mark.parametrize("name", ["ort130", "int4-130", "portable"])
def test_default_exports_run_in_onnxruntime_1_30(exports, name, cache):
    done = old_greedy(exports / name, PROMPTS, 8, cache)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["version"] == "1.30.0"
    if cache == "auto":
        assert result["cache"] == ("bound" if name == "portable" else "shared")
    here = Generator(exports / name, provider="cpu", cache=cache).generate(
        PROMPTS, max_new_tokens=8, use_eos=False
    )
    assert result["tokens"] == [r.token_ids for r in here]
    if name != "int4-130":  # fp32: also the functions graph's tokens
        reference = Generator(exports / "functions", provider="cpu").generate(
            PROMPTS, max_new_tokens=8, use_eos=False
        )
        assert result["tokens"] == [r.token_ids for r in reference]


@needs_old_venv
def test_cli_under_onnxruntime_1_30_refuses_a_1_32_export_in_one_line(exports):
    line = refusal_line(exports / "ort132")
    assert "needs onnxruntime >= 1.32, but 1.30.0 is installed" in line


def test_python_api_and_cli_take_the_version(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", WIDE, seed=5)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "graphattn.cli",
            "export",
            str(tmp_path / "hf"),
            "-o",
            str(tmp_path / "cli"),
            "--ort-version",
            "1.32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert all(len(n.input) == 17 for n in gqa_nodes(tmp_path / "cli"))
    bad = subprocess.run(
        [sys.executable, "-m", "graphattn.cli", "export", str(tmp_path / "hf"), "-o"]
        + [str(tmp_path / "bad"), "--ort-version", "1.2"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "ort_version" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
