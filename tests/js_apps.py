"""Helpers for the JavaScript app tests: where the apps are, why a test must skip, running
the Node app, the static server and the headless-Chromium driver, and SmolLM2 exports
shared by test_node_app.py and test_browser_app.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import checkpoints
import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
NODE_APP = ROOT / "examples" / "node"
WEB_APP = ROOT / "examples" / "web"
TRANSFORMERSJS_APP = ROOT / "examples" / "transformersjs"
CHROMIUM = Path("/usr/bin/chromium")
SETUP = "bash scripts/setup_js.sh"


MIN_NODE = (20, 9)  # playwright-core 1.65 and transformers.js 4.3's sharp need Node >= 20.9


def _node_problem() -> str | None:
    """Why ``node`` cannot run the examples (absent or older than MIN_NODE), or None."""
    if shutil.which("node") is None:
        return f"node is not installed (Node.js >= 20.9 and npm; then {SETUP})"
    done = subprocess.run(
        ["node", "-p", "process.versions.node"], capture_output=True, text=True, timeout=60
    )
    version = tuple(int(p) for p in done.stdout.strip().split(".")[:2] if p.isdigit())
    if version < MIN_NODE:
        return f"node {done.stdout.strip() or '?'} is older than 20.9, which the examples need"
    return None


def node_missing() -> str | None:
    """Why the Node app cannot run here, or None."""
    if _node_problem():
        return _node_problem()
    if not (NODE_APP / "node_modules" / "onnxruntime-node").is_dir():
        return f"examples/node/node_modules is missing (run {SETUP})"
    return None


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if _node_problem():
        return _node_problem()
    for package in ("onnxruntime-web", "playwright-core", "@huggingface/tokenizers"):
        if not (WEB_APP / "node_modules" / package).is_dir():
            return f"examples/web/node_modules/{package} is missing (run {SETUP})"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium, or {SETUP} as root)"
    return None


def transformersjs_missing() -> str | None:
    """Why the transformers.js example cannot run here, or None."""
    if _node_problem():
        return _node_problem()
    if not (TRANSFORMERSJS_APP / "node_modules" / "@huggingface" / "transformers").is_dir():
        return f"examples/transformersjs/node_modules is missing (run {SETUP})"
    return None


def run_transformersjs(directory: Path, prompt: list[int], steps: int, dtype=None) -> list[int]:
    """Token ids from examples/transformersjs/generate.mjs: ``pipeline('text-generation')`` on
    a ``--layout transformers.js`` export, ``steps`` greedy tokens with no stop at EOS."""
    command = ["node", "generate.mjs", str(directory), json.dumps(prompt), str(steps)]
    done = subprocess.run(
        [*command, *([dtype] if dtype else [])],
        cwd=TRANSFORMERSJS_APP,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(done.stderr.strip().splitlines()[-1])  # timings, shown with pytest -s
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_node(export_dir, *args, timeout=600) -> dict:
    """``node examples/node/chat.mjs EXPORT_DIR ARGS... --json`` -> its JSON report."""
    command = ["node", str(NODE_APP / "chat.mjs"), str(export_dir), *map(str, args), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def serve(export_dir):
    """The web example's static server on a free 127.0.0.1 port; yields its base URL."""
    server = subprocess.Popen(
        ["node", str(WEB_APP / "serve.mjs"), str(export_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line + server.stderr.read()
        yield line.split()[1]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()


def drive(url, tmp_path: Path, *, screenshot: str | None = None, timeout=600) -> dict:
    """Load ``url`` in headless Chromium with a fresh profile; window.result as a dict."""
    profile = tmp_path / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    command = [
        "node",
        str(WEB_APP / "drive.mjs"),
        url,
        "--user-data-dir",
        str(profile),
        "--timeout",
        str(timeout),
    ]
    if screenshot:
        command += ["--screenshot", str(tmp_path / screenshot)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 60)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def page_url(base: str, **query) -> str:
    from urllib.parse import urlencode

    values = {k: json.dumps(v) if isinstance(v, list) else v for k, v in query.items()}
    return f"{base}?{urlencode(values)}"


# Tiny random exports (model config, export options) for the Node and browser tests.
TINY_EXPORTS = {
    "gpt2": ({**checkpoints.GPT2, "vocab_size": 300}, {}),
    "llama": ({**checkpoints.LLAMA, "vocab_size": 300}, {}),
    "llama-portable": ({**checkpoints.LLAMA, "vocab_size": 300}, {"target": "portable"}),
    # float16 KV cache and logits (Uint16Array in Node 20, Float16Array in Chromium)
    "llama-fp16": ({**checkpoints.LLAMA, "vocab_size": 300}, {"precision": "fp16"}),
    # head_dim 16: the ort graph uses GroupQueryAttention (head_dim 8 keeps Attention)
    "llama-gqa-kernel": (
        checkpoints.llama_variant(vocab_size=300, hidden_size=64, intermediate_size=96),
        {"target": "ort"},
    ),
}


def tiny_export(root: Path, name: str) -> Path:
    """Write the tiny checkpoint ``name`` (with a trained tokenizer) under ``root`` and export
    it with its options; returns the export directory."""
    from graphattn import export

    config, options = TINY_EXPORTS[name]
    checkpoints.write_checkpoint(root / "hf", config, seed=11)
    tiny_tokenizer.write_tokenizer(root / "hf")
    export(root / "hf", root / "onnx", **options)
    return root / "onnx"


# SmolLM2 exports, made once per test session and shared by both test files.
SMOLLM2_EXPORTS = {
    "portable-fp32": dict(target="portable"),
    "ort-fp32": dict(target="ort"),
    "ort-int4": dict(target="ort", precision="int4"),
    "ort-int4-requantized": dict(target="ort", precision="int4", requantize=True),
    "ort-int4-float": dict(target="ort", precision="int4", accuracy_level=0),
}
_made: dict[str, Path] = {}


def smollm2_export(tmp_path_factory, name: str) -> Path:
    """An export of SmolLM2-135M (fetched GGUF, see test_smollm2.py), made once per session."""
    if name not in _made:
        from graphattn import export
        from graphattn.exporters.fetch import fetch

        out = tmp_path_factory.mktemp(f"smollm2-js-{name}") / "onnx"
        export(fetch("smollm2-135m", quiet=True), out, **SMOLLM2_EXPORTS[name])
        _made[name] = out
    return _made[name]
