"""Exports written before the I/O dims took Optimum's names (``batch``, ``sequence``,
``past_sequence``, ``total_sequence``; kept in ``tests/data/old_dims``, written by graphattn at
commit 11b5dce from ``checkpoints.write_checkpoint(..., seed=11)``) still load in our runtime
and decode the tokens of a fresh export of the same checkpoint."""

from pathlib import Path

import checkpoints
import onnx
import pytest

from graphattn import export
from graphattn.runtime import Generator

OLD = Path(__file__).parent / "data" / "old_dims"
CONFIGS = {"gpt2": checkpoints.GPT2, "llama": checkpoints.LLAMA}
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
    checkpoints.write_checkpoint(tmp_path / "hf", CONFIGS[name], seed=11)
    export(tmp_path / "hf", tmp_path / "new", target="portable")
    expected = Generator(tmp_path / "new", provider="cpu", cache=cache).generate(
        PROMPTS, max_new_tokens=8, use_eos=False
    )
    actual = Generator(old, provider="cpu", cache=cache).generate(
        PROMPTS, max_new_tokens=8, use_eos=False
    )
    assert [r.token_ids for r in actual] == [r.token_ids for r in expected]
