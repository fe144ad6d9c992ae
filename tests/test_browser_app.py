"""The web page (examples/web on onnxruntime-web 1.30.0, WASM) in Debian's headless Chromium,
driven by playwright-core: served by examples/web/serve.mjs with COOP/COEP headers, it runs
tiny exports and SmolLM2 int4 (slow) to completion, and its greedy ids equal our Python
runtime's. Each run saves a screenshot under the test's tmp dir."""

import json
import urllib.error
import urllib.request

import js_apps
import pytest

from graphattn import export
from graphattn.runtime import Generator

pytestmark = pytest.mark.skipif(
    js_apps.browser_missing() is not None, reason=str(js_apps.browser_missing())
)

TINY = ("gpt2", "llama-fp16", "llama-gqa-kernel")  # of js_apps.TINY_EXPORTS
PROMPT = [5, 17, 42, 8, 99]
BATCH = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 7, 3, 250]]


@pytest.fixture(scope="module", params=TINY)
def tiny(request, tmp_path_factory):
    out = js_apps.tiny_export(tmp_path_factory.mktemp(f"web-{request.param}"), request.param)
    with js_apps.serve(out) as base:
        yield out, base


def test_server_headers_types_and_paths(tiny):
    _, base = tiny
    expected = {
        "": "text/html",
        "app.mjs": "text/javascript",
        "common/decoder.mjs": "text/javascript",
        "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "application/wasm",
        "node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "text/javascript",
        "model/genai_config.json": "application/json",
        "model/model.onnx": "application/octet-stream",
    }
    for path, mime in expected.items():
        with urllib.request.urlopen(base + path) as response:
            assert response.headers["Content-Type"].startswith(mime), path
            assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    for path in ("model/%2e%2e/hf/config.json", "serve.mjs", "node_modules/playwright-core/"):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(base + path)
        assert error.value.code == 404, path


def test_page_greedy_ids_equal_python(tiny, tmp_path):
    out, base = tiny
    expected = Generator(out, provider="cpu").generate(PROMPT, max_new_tokens=12, use_eos=False)
    url = js_apps.page_url(base, ids=PROMPT, max=12, noeos=1)
    result = js_apps.drive(url, tmp_path, screenshot="page.png", timeout=180)
    assert "error" not in result, result
    assert result["ids"] == expected.token_ids
    assert result["crossOriginIsolated"] is True
    assert result["prefillTokS"] > 0 and result["decodeTokS"] > 0
    assert (tmp_path / "page.png").stat().st_size > 0


def test_page_batch_and_chat_equal_python(tiny, tmp_path):
    out, base = tiny
    generator = Generator(out, provider="cpu")
    expected = generator.generate(BATCH, max_new_tokens=8, use_eos=False)
    result = js_apps.drive(js_apps.page_url(base, ids=BATCH, max=8, noeos=1), tmp_path, timeout=180)
    assert result["ids"] == [row.token_ids for row in expected]
    prompt = "Once upon a time"
    chat = generator.generate(prompt, chat=True, max_new_tokens=16)
    result = js_apps.drive(
        js_apps.page_url(base, prompt=prompt, max=16, threads=1),
        tmp_path,
        screenshot="chat.png",
        timeout=180,
    )
    assert result["promptIds"] == chat.prompt_ids
    assert result["ids"] == chat.token_ids
    assert result["text"] == chat.text
    assert result["threads"] == 1


LOSSLESS_INT4_DIFFERS = (
    "depends on the CPU: on the lossless int4 export (the GGUF's Q4_1 blocks, MatMulNBits"
    " accuracy_level 4) native onnxruntime CPU computes with int8 activations; on an AVX-512"
    " VNNI machine it answered 'La femme de France, ...' where WASM (float) answers 'The"
    " capital of France is Paris.'; on an AVX2-only machine (2026-12-02) native gives WASM's"
    " ids. Not strict for that reason; the guarantee is the next test (WASM = Python's"
    " accuracy_level-0 export)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "ort-int4",
            marks=pytest.mark.xfail(
                reason=LOSSLESS_INT4_DIFFERS, strict=False, raises=AssertionError
            ),
        ),
        "ort-int4-requantized",
    ],
)
def test_smollm2_int4_in_the_browser_equals_python(name, tmp_path_factory, tmp_path):
    browser_smollm2_equals_python(name, name, tmp_path_factory, tmp_path)


@pytest.mark.slow
def test_smollm2_lossless_int4_in_the_browser_computes_in_float(tmp_path_factory, tmp_path):
    """WASM has no int8-activation MatMulNBits: on the default (accuracy_level 4) lossless
    int4 export the page gives the ids Python gives on the accuracy_level-0 export."""
    browser_smollm2_equals_python("ort-int4", "ort-int4-float", tmp_path_factory, tmp_path)


def browser_smollm2_equals_python(name, reference, tmp_path_factory, tmp_path):
    """The page on the SmolLM2 export ``name`` gives the ids of Python on ``reference``."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    out = js_apps.smollm2_export(tmp_path_factory, name)
    prompt = "What is the capital of France?"
    expected = Generator(js_apps.smollm2_export(tmp_path_factory, reference), provider="cpu")
    expected = expected.generate(prompt, chat=True, max_new_tokens=16, use_eos=False)
    with js_apps.serve(out) as base:
        url = js_apps.page_url(base, prompt=prompt, max=16, noeos=1)
        result = js_apps.drive(url, tmp_path, screenshot=f"smollm2-{name}.png", timeout=900)
    print(json.dumps({k: result[k] for k in ("prefillTokS", "decodeTokS", "threads", "text")}))
    assert "error" not in result, result
    assert result["promptIds"] == expected.prompt_ids
    assert result["ids"] == expected.token_ids


def test_page_loads_the_transformersjs_layout(tmp_path):
    """The page finds onnx/model.onnx and its onnx/model.onnx_data through genai_config.json."""
    root = tmp_path / "tiny"
    js_apps.tiny_export(root, "llama")
    export(root / "hf", root / "tjs", layout="transformers.js")
    expected = Generator(root / "tjs", provider="cpu").generate(
        PROMPT, max_new_tokens=8, use_eos=False
    )
    with js_apps.serve(root / "tjs") as base:
        result = js_apps.drive(js_apps.page_url(base, ids=PROMPT, max=8, noeos=1), tmp_path)
    assert "error" not in result, result
    assert result["ids"] == expected.token_ids
