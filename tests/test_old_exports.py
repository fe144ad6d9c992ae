"""Exports written before the I/O dims took Optimum's names (``batch``, ``sequence``,
``past_sequence``, ``total_sequence``; kept in ``tests/data/old_dims``, written by graphattn at
commit 11b5dce from ``checkpoints.write_checkpoint(..., seed=11)``: GPT-2 and Llama portable,
and a head_dim-16 Llama on that commit's default ``ort`` target, whose GroupQueryAttention has
onnxruntime 1.32's 17 inputs and no ``graphattn.min_onnxruntime``) still load in our runtime
and decode the tokens of a fresh export of the same checkpoint; under onnxruntime 1.30 the
``ort`` one is refused in one line that says to re-export."""

from pathlib import Path

import checkpoints
import onnx
import pytest
from old_runtime import needs_old_venv, refusal_line

from graphattn import export
from graphattn.runtime import Generator

OLD = Path(__file__).parent / "data" / "old_dims"
CONFIGS = {
    "gpt2": (checkpoints.GPT2, "portable"),
    "llama": (checkpoints.LLAMA, "portable"),
    "llama-gqa": (checkpoints.llama_variant(hidden_size=64, intermediate_size=96), "ort"),
}
PROMPTS = [[5, 17, 42, 8, 11, 60, 3], [40, 41]]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("cache", ["auto", "plain"])
def test_old_dim_names_still_load_and_decode_the_same(tmp_path, name, cache):
    old = OLD / name
    dims = {
        d.dim_param
        for value in onnx.load(str(old / "model.onnx"), load_external_data=False).graph.input
        for d in value.type.tensor_type.shape.dim
        if d.dim_param
    }
    assert dims == {"batch", "sequence", "past_sequence", "total_sequence"}
    config, target = CONFIGS[name]
    checkpoints.write_checkpoint(tmp_path / "hf", config, seed=11)
    export(tmp_path / "hf", tmp_path / "new", target=target)
    expected = Generator(tmp_path / "new", provider="cpu", cache=cache).generate(
        PROMPTS, max_new_tokens=8, use_eos=False
    )
    actual = Generator(old, provider="cpu", cache=cache).generate(
        PROMPTS, max_new_tokens=8, use_eos=False
    )
    assert [r.token_ids for r in actual] == [r.token_ids for r in expected]


@needs_old_venv
def test_old_ort_export_under_onnxruntime_1_30_is_refused_in_one_line():
    line = refusal_line(OLD / "llama-gqa")
    assert "onnxruntime 1.30.0 cannot load its GroupQueryAttention" in line
    assert "--ort-version 1.30" in line
