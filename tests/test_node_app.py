"""The Node.js app (examples/node/chat.mjs on onnxruntime-node 1.30.0): its greedy token ids
equal our Python runtime's on tiny GPT-2 and Llama exports (default, portable and ort
targets, GroupQueryAttention and fp16 included), on a left-padded batch, through the chat template,
and on SmolLM2 (slow) for portable fp32, ort fp32, ort int4 lossless and requantized."""

import subprocess

import js_apps
import pytest

from graphattn.runtime import Generator

pytestmark = pytest.mark.skipif(
    js_apps.node_missing() is not None, reason=str(js_apps.node_missing())
)

PROMPT = [5, 17, 42, 8, 99]
BATCH = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 7, 3, 250]]
STEPS = 12


@pytest.fixture(scope="module", params=list(js_apps.TINY_EXPORTS))
def tiny(request, tmp_path_factory):
    return js_apps.tiny_export(tmp_path_factory.mktemp(f"node-{request.param}"), request.param)


def test_greedy_ids_equal_python(tiny):
    expected = Generator(tiny, provider="cpu").generate(PROMPT, max_new_tokens=STEPS, use_eos=False)
    report = js_apps.run_node(tiny, "--ids", PROMPT, "--max-new-tokens", STEPS, "--no-eos")
    assert report["ids"] == expected.token_ids
    assert report["prefillTokS"] > 0 and report["decodeTokS"] > 0


def test_left_padded_batch_equals_python(tiny):
    expected = Generator(tiny, provider="cpu").generate(BATCH, max_new_tokens=10, use_eos=False)
    report = js_apps.run_node(tiny, "--ids", BATCH, "--max-new-tokens", 10, "--no-eos")
    assert report["ids"] == [row.token_ids for row in expected]


def test_chat_prompt_and_eos_equal_python(tiny):
    generator = Generator(tiny, provider="cpu")
    prompt = "Once upon a time"
    report = js_apps.run_node(tiny, prompt, "--max-new-tokens", 16)
    assert report["prompt_ids"] == generator.encode(prompt, chat=True)
    expected = generator.generate(prompt, chat=True, max_new_tokens=16)
    assert report["ids"] == expected.token_ids


def test_streamed_text_equals_python(tiny):
    generator = Generator(tiny, provider="cpu")
    prompt = "def attention("
    expected = "".join(generator.stream(prompt, chat=True, max_new_tokens=20))
    done = subprocess.run(
        ["node", str(js_apps.NODE_APP / "chat.mjs"), str(tiny), prompt, "--max-new-tokens", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    assert "prefill:" in done.stderr and "tok/s" in done.stderr


def test_bad_input_is_one_line_error(tiny):
    done = subprocess.run(
        ["node", str(js_apps.NODE_APP / "chat.mjs"), str(tiny), "--ids", "[5, 99999]", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: token id 99999 is outside the vocabulary")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(js_apps.SMOLLM2_EXPORTS))
def test_smollm2_node_equals_python(name, tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    out = js_apps.smollm2_export(tmp_path_factory, name)
    generator = Generator(out, provider="cpu")
    prompt = "What is the capital of France?"
    expected = generator.generate(prompt, chat=True, max_new_tokens=32, use_eos=False)
    report = js_apps.run_node(out, prompt, "--max-new-tokens", 32, "--no-eos")
    assert report["prompt_ids"] == expected.prompt_ids
    assert report["ids"] == expected.token_ids


def test_chat_template_file_wins_as_in_python(tmp_path):
    """An export with chat_template.jinja: the Node app renders that file, not the config's
    template, as graphattn.runtime does."""
    out = js_apps.tiny_export(tmp_path, "llama")
    (out / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    )
    generator = Generator(out, provider="cpu")
    prompt = "Once upon a time"
    expected = generator.encode(prompt, chat=True)
    assert expected != generator.encode(prompt)  # the template changes the ids
    report = js_apps.run_node(out, prompt, "--max-new-tokens", 4)
    assert report["prompt_ids"] == expected
