"""The README's compatibility table, checked: every target × precision of one tiny Llama
(head_dim 16, so the ``ort`` target really uses GroupQueryAttention) on every runtime an app
may bring — onnxruntime 1.30 in Python (``.venv-ort130``), onnxruntime-node 1.30
(examples/node), onnxruntime-web 1.30 WASM in headless Chromium (examples/web),
transformers.js 4.3.1 (examples/transformersjs, on the ``--layout transformers.js`` export) and
ONNX Runtime GenAI's generator. Each cell either gives the greedy token ids of our Python
runtime (onnxruntime ≥ 1.32) on the same export, or behaves as :data:`EXPECTED` says: refused
(with those words), or ``FLOAT``: WASM has no int8-activation MatMulNBits kernel, so it
ignores ``accuracy_level`` 4 and computes in float, giving the tokens of the same export made
with ``accuracy_level=0`` (native onnxruntime quantizes activations to int8 there).

A runtime that is not installed here skips its cells with the reason."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import checkpoints
import js_apps
import pytest
import tiny_tokenizer
from genai_runner import genai_greedy
from old_runtime import OLD_PYTHON, old_greedy

from graphattn import export
from graphattn.runtime import Generator

ROOT = Path(__file__).resolve().parents[1]
CONFIG = checkpoints.llama_variant(vocab_size=300, hidden_size=64, intermediate_size=96)
PROMPT = [5, 17, 42, 8, 99, 120, 7]
STEPS = 10

EXPORTS = {
    "functions fp32": dict(target="functions"),
    "portable fp32": dict(target="portable"),
    "portable fp16": dict(target="portable", precision="fp16"),
    "portable int8": dict(target="portable", precision="int8"),
    "portable int4": dict(target="portable", precision="int4"),
    "ort fp32": dict(target="ort"),
    "ort fp16": dict(target="ort", precision="fp16"),
    "ort int8": dict(target="ort", precision="int8"),
    "ort int4": dict(target="ort", precision="int4"),
    "ort int4 --dequantize-at-load": dict(target="ort", precision="int4", dequantize_at_load=True),
    "ort fp32 --ort-version 1.32": dict(target="ort", ort_version="1.32"),
}
RUNTIMES = ("python-1.30", "node", "web", "transformers.js", "genai")
# Cells that do not give our tokens, and the words their refusal contains.
NEEDS_1_32 = "GroupQueryAttention"  # 17 inputs: 1.30's schema takes at most 16
# our JS apps read genai_config's graphattn.min_onnxruntime before loading the graph
OUR_APPS_SAY = r"the export needs onnxruntime >= 1\.32, but this is 1\.30\.0"
FLOAT = "float compute"
EXPECTED = {
    ("ort int8", "web"): FLOAT,
    ("ort int4", "web"): FLOAT,
    ("ort fp32 --ort-version 1.32", "python-1.30"): "needs onnxruntime >= 1.32",
    ("ort fp32 --ort-version 1.32", "node"): OUR_APPS_SAY,
    ("ort fp32 --ort-version 1.32", "web"): OUR_APPS_SAY,
    ("ort fp32 --ort-version 1.32", "transformers.js"): NEEDS_1_32,
}


class RefusedError(Exception):
    """A runtime would not load or run the export; the message says why."""


def _run(command: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RefusedError(done.stderr.strip()[-2000:])
    return done.stdout.strip().splitlines()[-1]


def python_130(out: Path, prompt: list[int]) -> list[int]:
    done = old_greedy(out, prompt, STEPS)
    if done.returncode != 0:
        raise RefusedError(done.stderr.strip()[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens"]


def node(out: Path, prompt: list[int]) -> list[int]:
    command = ["node", str(js_apps.NODE_APP / "chat.mjs"), str(out), "--ids", json.dumps(prompt)]
    return json.loads(_run([*command, "--max-new-tokens", str(STEPS), "--no-eos", "--json"]))["ids"]


def web(out: Path, prompt: list[int], tmp_path: Path) -> list[int]:
    with js_apps.serve(out) as base:
        url = js_apps.page_url(base, ids=prompt, max=STEPS, noeos=1)
        try:
            result = js_apps.drive(url, tmp_path, timeout=180)
        except AssertionError as error:
            raise RefusedError(str(error)) from None
    if "error" in result:
        raise RefusedError(str(result["error"]))
    return result["ids"]


def transformersjs(out: Path, prompt: list[int]) -> list[int]:
    try:
        return js_apps.run_transformersjs(out, prompt, STEPS)
    except AssertionError as error:
        raise RefusedError(str(error)) from None


def genai(out: Path, prompt: list[int]) -> list[int]:
    try:
        return genai_greedy(out, prompt, STEPS)
    except RuntimeError as error:  # GenAI raises plain RuntimeErrors
        raise RefusedError(str(error)) from None


def missing(runtime: str) -> str | None:
    if runtime == "python-1.30":
        return None if OLD_PYTHON.is_file() else "no .venv-ort130 (scripts/setup_ort130.sh)"
    if runtime == "node":
        return js_apps.node_missing()
    if runtime == "web":
        return js_apps.browser_missing()
    if runtime == "transformers.js":
        return js_apps.transformersjs_missing()
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (test extra)"
    return None


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    config = {**CONFIG, "eos_token_id": 2}
    checkpoints.write_checkpoint(root / "hf", config, seed=7)
    tiny_tokenizer.write_tokenizer(root / "hf")
    made = {}
    for name, options in EXPORTS.items():
        slug = name.replace(" ", "-").replace("--", "")
        export(root / "hf", root / slug, **options)
        layout = root / f"{slug}-tjs"
        if options.get("target") != "functions":
            export(root / "hf", layout, layout="transformers.js", **options)
        made[name] = (root / slug, layout)
        if options.get("precision") in ("int8", "int4") and options["target"] == "ort":
            export(root / "hf", root / f"{slug}-float", accuracy_level=0, **options)
            made[f"{name} float"] = (root / f"{slug}-float", None)
    return made


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", list(EXPORTS))
def test_compatibility_cell(exports, name, runtime, tmp_path):
    why = missing(runtime)
    if why:
        pytest.skip(why)
    out, layout = exports[name]
    if runtime == "transformers.js" and name.startswith("functions"):
        pytest.skip("the transformers.js layout is written for the portable and ort targets")
    refusal = EXPECTED.get((name, runtime))
    reference = exports[f"{name} float"][0] if refusal == FLOAT else out
    expected = Generator(reference, provider="cpu").generate(
        PROMPT, max_new_tokens=STEPS, use_eos=False
    )
    run = {
        "python-1.30": lambda: python_130(out, PROMPT),
        "node": lambda: node(out, PROMPT),
        "web": lambda: web(out, PROMPT, tmp_path),
        "transformers.js": lambda: transformersjs(layout, PROMPT),
        "genai": lambda: genai(out, PROMPT),
    }[runtime]
    if refusal in (None, FLOAT):
        assert run() == expected.token_ids, f"{name} on {runtime}"
    else:
        with pytest.raises(RefusedError, match=refusal):
            run()
