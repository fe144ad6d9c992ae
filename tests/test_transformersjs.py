"""``graphattn export --layout transformers.js``: the files transformers.js 4.3.1 reads, and its
greedy decoding in Node (examples/transformersjs, onnxruntime-node 1.30.0) giving the same
token ids as graphattn.runtime on the same directory.

The layout tests need neither Node nor npm. The Node tests skip, with the reason, where
``node`` or ``examples/transformersjs/node_modules`` (``npm ci`` there) is missing. The
compiler target is one parameter (``TARGETS``): the default and ``portable``.
"""

import json
import subprocess
from pathlib import Path

import checkpoints
import js_apps
import numpy as np
import onnx
import pytest
import tiny_tokenizer

from graphattn import export
from graphattn.exporters.export import DEFAULT_TARGET
from graphattn.exporters.transformersjs_layout import (
    arrange,
    chunk_names,
    external_tensors,
    model_file_name,
)
from graphattn.models import architecture_for
from graphattn.runtime import Generator, Tokenizer
from graphattn.spec import BATCH, PAST, SEQUENCE, TOTAL

EXAMPLE = js_apps.TRANSFORMERSJS_APP
TARGETS = tuple(dict.fromkeys((DEFAULT_TARGET, "portable")))
PROMPT = [5, 17, 42, 8, 99]
TINY = {
    "llama": {**checkpoints.LLAMA, "vocab_size": 300, "eos_token_id": 2},
    "gpt2": {**checkpoints.GPT2, "vocab_size": 300, "eos_token_id": 2},
}


def node_missing() -> str | None:
    """Why the Node tests cannot run here, or None."""
    return js_apps.transformersjs_missing()


needs_node = pytest.mark.skipif(node_missing() is not None, reason=str(node_missing()))
transformersjs_greedy = js_apps.run_transformersjs


def transformersjs_chat_ids(directory: Path, message: str) -> list[int]:
    """Ids of a one-message chat prompt from transformers.js's tokenizer (chat_ids.mjs)."""
    done = subprocess.run(
        ["node", "chat_ids.mjs", str(directory), message],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def runtime_chat_ids(directory: Path, message: str) -> list[int]:
    tokenizer = Tokenizer(directory)
    chat = tokenizer.chat([{"role": "user", "content": message}])
    return tokenizer.encode(chat, add_special_tokens=False)


def runtime_greedy(directory: Path, prompt: list[int], steps: int) -> list[int]:
    generator = Generator(directory, provider="cpu")
    # the tokenizer stays at the top, beside genai_config.json, not beside onnx/model.onnx
    assert generator.tokenizer is not None
    return generator.generate(prompt, max_new_tokens=steps, use_eos=False).token_ids


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """{family: HF directory} of tiny random checkpoints with a trained tokenizer."""
    root = tmp_path_factory.mktemp("tjs-hf")
    directories = {}
    for family, config in TINY.items():
        checkpoints.write_checkpoint(root / family, config, seed=11)
        tiny_tokenizer.write_tokenizer(root / family)
        directories[family] = root / family
    return directories


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    ("precision", "name"),
    [
        ("fp32", "model.onnx"),
        ("fp16", "model_fp16.onnx"),
        ("int4", "model_q4.onnx"),
        ("int8", "model_quantized.onnx"),
    ],
)
def test_precision_names_the_file_transformersjs_loads(precision, name):
    assert model_file_name(precision) == name
    assert chunk_names(name, 3) == [f"{name}_data", f"{name}_data_1", f"{name}_data_2"]


def test_unknown_layout_or_precision_is_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="layout must be one of"):
        export(tiny_checkpoints["llama"], tmp_path / "x", layout="optimum")
    with pytest.raises(ValueError, match="needs target portable or ort"):
        export(
            tiny_checkpoints["llama"], tmp_path / "x", layout="transformers.js", target="functions"
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="precision must be one of"):
        model_file_name("int2")


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_layout_files_locations_and_config(tiny_checkpoints, tmp_path, precision):
    out = tmp_path / "tjs"
    result = export(tiny_checkpoints["llama"], out, precision=precision, layout="transformers.js")
    name = model_file_name(precision)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        [
            "config.json",
            "generation_config.json",
            "genai_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            f"onnx/{name}",
            f"onnx/{name}_data",
        ]
    )
    assert {p.relative_to(out).as_posix() for p in result.paths} == set(written)
    assert result.model == out / "onnx" / name and result.data == out / "onnx" / f"{name}_data"

    model = onnx.load(str(out / "onnx" / name), load_external_data=False)
    locations = {
        entry.value
        for tensor in external_tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {f"{name}_data"}
    # transformers.js builds its first, empty cache from these dims, resolving only batch_size
    shapes = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    dims = {name: [d.dim_param or d.dim_value for d in shape] for name, shape in shapes.items()}
    assert dims["input_ids"] == [BATCH, SEQUENCE]
    assert dims["attention_mask"] == [BATCH, TOTAL]
    assert dims["past_key_values.0.key"] == [BATCH, 2, PAST, 8]

    config = json.loads((out / "config.json").read_text())
    source = TINY["llama"]
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "vocab_size",
        "eos_token_id",
    ):
        assert config[key] == source[key], key
    assert config["head_dim"] == 8
    dtype = {"fp32": "fp32", "int4": "q4"}[precision]
    assert config["transformers.js_config"] == {
        "dtype": dtype,
        "use_external_data_format": {name: 1},
    }
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == f"onnx/{name}"


def test_layout_runs_in_the_runtime_like_the_genai_layout(tiny_checkpoints, tmp_path):
    export(tiny_checkpoints["llama"], tmp_path / "genai")
    export(tiny_checkpoints["llama"], tmp_path / "tjs", layout="transformers.js")
    assert runtime_greedy(tmp_path / "tjs", PROMPT, 12) == runtime_greedy(
        tmp_path / "genai", PROMPT, 12
    )


def test_gpt2_config_uses_gpt2_key_names(tiny_checkpoints, tmp_path):
    export(tiny_checkpoints["gpt2"], tmp_path / "tjs", layout="transformers.js")
    config = json.loads((tmp_path / "tjs" / "config.json").read_text())
    source = TINY["gpt2"]
    assert config["model_type"] == "gpt2"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        assert config[key] == source[key], key


def chunked_export(source: Path, out: Path, chunk_bytes: int) -> list[str]:
    """A genai-layout export of ``source`` turned into the transformers.js layout by
    :func:`arrange` with external data split into chunks of ``chunk_bytes``."""
    export(source, out)
    config = json.loads((source / "config.json").read_text())
    cfg = architecture_for(config).config_from_hf(config)
    arrange(out, config, cfg, "fp32", chunk_bytes=chunk_bytes)
    return sorted(p.name for p in (out / "onnx").iterdir() if "_data" in p.name)


def test_large_data_is_split_into_chunks_that_load(tiny_checkpoints, tmp_path):
    chunks = chunked_export(tiny_checkpoints["llama"], tmp_path / "tjs", 40_000)
    assert chunks == chunk_names("model.onnx", len(chunks)) and len(chunks) >= 3
    assert all((tmp_path / "tjs" / "onnx" / c).stat().st_size <= 40_000 for c in chunks)
    config = json.loads((tmp_path / "tjs" / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {
        "model.onnx": len(chunks)
    }
    export(tiny_checkpoints["llama"], tmp_path / "genai")
    chunked = Generator(tmp_path / "tjs", provider="cpu").model
    whole = Generator(tmp_path / "genai", provider="cpu").model
    ids = np.array([PROMPT])
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(len(PROMPT))[None],
        **{n: np.zeros((1, 2, 0, 8), np.float32) for n in whole.input_names if "past" in n},
    }
    feeds = {n: v for n, v in feeds.items() if n in whole.input_names}
    np.testing.assert_array_equal(
        chunked.session.run(["logits"], feeds)[0], whole.session.run(["logits"], feeds)[0]
    )


# ------------------------------------------------------------------------- transformers.js
@needs_node
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", list(TINY))
def test_tiny_greedy_ids_equal_the_runtime(tiny_checkpoints, tmp_path, family, target):
    out = tmp_path / "tjs"
    export(tiny_checkpoints[family], out, target=target, layout="transformers.js")
    assert transformersjs_greedy(out, PROMPT, 12) == runtime_greedy(out, PROMPT, 12)


@needs_node
def test_tiny_chat_prompt_ids_equal_the_runtime(tiny_checkpoints, tmp_path):
    export(tiny_checkpoints["llama"], tmp_path / "tjs", layout="transformers.js")
    message = "Once upon a time — Héllo wörld 🙂"
    assert transformersjs_chat_ids(tmp_path / "tjs", message) == runtime_chat_ids(
        tmp_path / "tjs", message
    )


@needs_node
def test_chunked_external_data_loads_in_transformersjs(tiny_checkpoints, tmp_path):
    chunked_export(tiny_checkpoints["llama"], tmp_path / "tjs", 40_000)
    assert transformersjs_greedy(tmp_path / "tjs", PROMPT, 12) == runtime_greedy(
        tmp_path / "tjs", PROMPT, 12
    )


@pytest.fixture(scope="module")
def smollm2_gguf():
    from graphattn.exporters.fetch import fetch

    return fetch("smollm2-135m", quiet=True)


@needs_node
@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", "fp32"), ("int4", "q4")])
def test_smollm2_greedy_ids_equal_the_runtime(smollm2_gguf, tmp_path, target, precision, dtype):
    """SmolLM2-135M from its GGUF: 32 greedy tokens after the chat prompt, in transformers.js
    (dtype passed as a user would) and in graphattn.runtime, on the same directory; both
    tokenizers give the same chat prompt ids."""
    out = tmp_path / "tjs"
    export(smollm2_gguf, out, target=target, precision=precision, layout="transformers.js")
    message = "What is the capital of France?"
    prompt = runtime_chat_ids(out, message)
    assert transformersjs_chat_ids(out, message) == prompt
    expected = runtime_greedy(out, prompt, 32)
    assert transformersjs_greedy(out, prompt, 32, dtype) == expected
    if precision == "fp32":
        assert "Paris" in Tokenizer(out).decode(expected)


@needs_node
@pytest.mark.slow
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", "fp32"), ("int4", "q4")])
def test_smollm2_pipeline_chat_equals_the_runtime(smollm2_gguf, tmp_path, precision, dtype):
    """The pipeline itself, called as an app calls it (chat messages in, greedy, EOS stops):
    its reply is the text graphattn.runtime generates for the same message."""
    out = tmp_path / "tjs"
    export(smollm2_gguf, out, precision=precision, layout="transformers.js")
    message = "What is the capital of France?"
    done = subprocess.run(
        ["node", "chat.mjs", str(out), message, "24", dtype],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    expected = Generator(out, provider="cpu").generate(message, chat=True, max_new_tokens=24)
    assert reply.strip() == expected.text.strip()
