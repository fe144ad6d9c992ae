"""The runtime: greedy decoding against a step-by-step NumPy reference, batching with left
padding, seeded sampling, streaming, both KV caches, bad input, and the CLI."""

import json
import subprocess
import sys

import checkpoints
import numpy as np
import numpy_forward
import pytest
import tiny_tokenizer

from graphattn import export
from graphattn.runtime import (
    ContextLengthError,
    Generator,
    ModelLoadError,
    ModelSession,
    cuda_available,
)

RUNTIME_MODELS = {
    "gpt2": {**checkpoints.GPT2, "vocab_size": 300, "eos_token_id": 2},
    "llama": {**checkpoints.LLAMA, "vocab_size": 300, "eos_token_id": 2},
}


@pytest.fixture(scope="module", params=list(RUNTIME_MODELS))
def model(request, tmp_path_factory):
    config = RUNTIME_MODELS[request.param]
    root = tmp_path_factory.mktemp(f"runtime-{request.param}")
    weights = checkpoints.write_checkpoint(root / "hf", config, seed=11)
    tiny_tokenizer.write_tokenizer(root / "hf")
    export(root / "hf", root / "onnx")
    return request.param, config, weights, root / "onnx"


def reference_greedy(weights, config, prompt, steps, stop=()):
    """Greedy decode by re-running the independent NumPy forward pass over the whole text."""
    tokens = list(prompt)
    out = []
    for _ in range(steps):
        ids = np.array([tokens])
        mask = np.ones_like(ids)
        logits, _ = numpy_forward.forward(weights, config, ids, mask, np.arange(len(tokens))[None])
        token = int(np.argmax(logits[0, -1]))
        out.append(token)
        tokens.append(token)
        if token in stop:
            break
    return out


@pytest.mark.parametrize("cache", ["bound", "plain"])
def test_greedy_matches_numpy_reference(model, cache):
    name, config, weights, out_dir = model
    generator = Generator(out_dir, provider="cpu", cache=cache)
    prompt = [5, 17, 42, 8, 99]
    result = generator.generate(prompt, max_new_tokens=12, use_eos=False)
    assert result.token_ids == reference_greedy(weights, config, prompt, 12)


def test_left_padded_batch_equals_each_prompt_alone(model):
    name, config, _, out_dir = model
    generator = Generator(out_dir, provider="cpu")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 7, 3, 250]]
    batch = generator.generate(prompts, max_new_tokens=10, use_eos=False)
    for prompt, result in zip(prompts, batch):
        alone = generator.generate(prompt, max_new_tokens=10, use_eos=False)
        assert result.token_ids == alone.token_ids, prompt


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    _, _, _, out_dir = model
    generator = Generator(out_dir, provider="cpu")
    prompt = [5, 17, 42]
    sampled = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, use_eos=False)
    first = generator.generate(prompt, seed=123, **sampled).token_ids
    again = generator.generate(prompt, seed=123, **sampled).token_ids
    others = {tuple(generator.generate(prompt, seed=s, **sampled).token_ids) for s in range(5)}
    assert first == again
    assert len(others) > 1  # the seed matters
    greedy = generator.generate(prompt, max_new_tokens=16, use_eos=False).token_ids
    top1 = generator.generate(
        prompt, max_new_tokens=16, temperature=0.7, top_k=1, seed=9, use_eos=False
    ).token_ids
    assert top1 == greedy


def test_stop_tokens_end_generation(model):
    name, config, weights, out_dir = model
    generator = Generator(out_dir, provider="cpu")
    prompt = [5, 17, 42, 8, 99]
    free = generator.generate(prompt, max_new_tokens=8, use_eos=False).token_ids
    stop = free[3]
    stopped = generator.generate(prompt, max_new_tokens=8, stop=[stop], use_eos=False)
    assert stopped.token_ids == free[: free.index(stop) + 1]
    assert stopped.stopped_by == "stop"


def test_streaming_equals_non_streaming_text(model):
    _, _, _, out_dir = model
    generator = Generator(out_dir, provider="cpu")
    for prompt in ("Once upon a time", "Héllo wörld 🙂", "def attention("):
        whole = generator.generate(prompt, max_new_tokens=20, use_eos=False)
        pieces = list(generator.stream(prompt, max_new_tokens=20, use_eos=False))
        assert "".join(pieces) == whole.text
        assert len(pieces) > 1


def test_bound_cache_holds_what_plain_cache_returns(model):
    _, config, _, out_dir = model
    session = ModelSession(out_dir, provider="cpu")
    bound, plain = Generator(session, cache="bound"), Generator(session, cache="plain")
    prompt = [5, 17, 42, 8]
    assert (
        bound.generate(prompt, max_new_tokens=6).token_ids
        == plain.generate(prompt, max_new_tokens=6).token_ids
    )
    for layer in range(session.config.num_layers):
        key, value = bound.cache.layer(layer)
        np.testing.assert_array_equal(key, plain.cache.pasts[layer][0])
        np.testing.assert_array_equal(value, plain.cache.pasts[layer][1])


def test_chat_template_renders_and_generates(model):
    _, _, _, out_dir = model
    generator = Generator(out_dir, provider="cpu")
    text = generator.tokenizer.chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = generator.encode("hi", chat=True)
    assert ids[0] == generator.tokenizer.token_id("<|im_start|>")
    assert len(generator.generate("hi", chat=True, max_new_tokens=3).token_ids) >= 1


def test_bad_input_gives_clear_errors(model, tmp_path):
    _, config, _, out_dir = model
    generator = Generator(out_dir, provider="cpu")
    with pytest.raises(ValueError, match="prompt is empty"):
        generator.generate("", max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt is empty"):
        generator.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token id 300 is outside the vocabulary \[0, 300\)"):
        generator.generate([1, 300], max_new_tokens=2)
    context = config.get("n_positions") or config["max_position_embeddings"]
    with pytest.raises(ContextLengthError, match=f"exceeds the context of {context} tokens"):
        generator.generate([5] * (context - 2), max_new_tokens=5)
    with pytest.raises(ModelLoadError, match="no model"):
        Generator(tmp_path, provider="cpu")
    with pytest.raises(ContextLengthError, match="max_length"):
        Generator(out_dir, provider="cpu", max_length=context + 1)


def test_model_whose_io_does_not_match_its_config(model, tmp_path):
    _, _, _, out_dir = model
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in out_dir.iterdir():
        (broken / path.name).symlink_to(path)
    genai = json.loads((out_dir / "genai_config.json").read_text())
    genai["model"]["decoder"]["num_hidden_layers"] = 5
    (broken / "genai_config.json").unlink()
    (broken / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(
        ModelLoadError, match=r"'past_key_values.2.key' is missing.*num_hidden_layers=5"
    ):
        ModelSession(broken, provider="cpu")
    genai["model"]["decoder"]["num_hidden_layers"] = 2
    genai["model"]["decoder"]["head_size"] = 99
    (broken / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(ModelLoadError, match="config says"):
        ModelSession(broken, provider="cpu")


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "graphattn", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_generate_and_bench(model, tmp_path):
    _, _, _, out_dir = model
    done = cli(
        "generate",
        str(out_dir),
        "--prompt",
        "Once upon",
        "--max-new-tokens",
        "8",
        "--provider",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    expected = Generator(out_dir, provider="cpu").generate("Once upon", max_new_tokens=8)
    assert done.stdout.rstrip("\n") == expected.text
    assert "decode" in done.stderr and "tok/s" in done.stderr
    bench = cli(
        "bench",
        str(out_dir),
        "--prompt-len",
        "8",
        "--new-tokens",
        "4",
        "--json",
        "--repeats",
        "1",
        "--provider",
        "cpu",
    )
    assert bench.returncode == 0, bench.stderr
    rows = json.loads(bench.stdout)
    assert [r["cache"] for r in rows] == ["bound", "plain"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows)
    for bad in (
        ["generate", str(tmp_path), "--prompt", "x"],
        ["generate", str(out_dir), "--prompt", ""],
        ["generate", str(out_dir), "--prompt", "x", "--max-new-tokens", "100000"],
    ):
        failed = cli(*bad)
        assert failed.returncode == 1
        assert (
            failed.stderr.startswith("graphattn: error:") and len(failed.stderr.splitlines()) == 1
        )


def test_runtime_never_imports_the_builder():
    code = (
        "import sys, graphattn.runtime; "
        "names = ('onnxscript', 'graphattn.ops', 'graphattn.builder'); "
        "bad = [m for m in names if m in sys.modules]; "
        "print(bad)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDAExecutionProvider in this onnxruntime")
@pytest.mark.parametrize("cache", ["bound", "plain"])
def test_greedy_on_cuda_matches_numpy_reference(model, cache):
    name, config, weights, out_dir = model
    generator = Generator(out_dir, provider="cuda", cache=cache)
    assert generator.model.device == "cuda"
    prompt = [5, 17, 42, 8, 99]
    result = generator.generate(prompt, max_new_tokens=12, use_eos=False)
    assert result.token_ids == reference_greedy(weights, config, prompt, 12)
    if cache == "bound":
        assert generator.cache.buffers[0][0][0].device_name() == "cuda"
