"""Apps built on ONNX Runtime GenAI run our exports unchanged: its generator loads our
``genai_config.json`` and graph (portable; ort with GroupQueryAttention and the shared KV
buffer) and decodes the same greedy tokens as graphattn's runtime."""

import checkpoints
import pytest
from genai_runner import genai_greedy

from graphattn import export
from graphattn.runtime import Generator

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra")

CONFIG = {**checkpoints.llama_variant(hidden_size=64, intermediate_size=96), "vocab_size": 96}
PROMPT = [5, 17, 42, 8, 11, 60, 3]


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_genai_generator_decodes_our_tokens(tmp_path, target):
    checkpoints.write_checkpoint(tmp_path / "hf", CONFIG, seed=3)
    out = tmp_path / target
    export(tmp_path / "hf", out, target=target)
    ours = Generator(out, provider="cpu").generate(PROMPT, max_new_tokens=12, use_eos=False)
    theirs = genai_greedy(out, PROMPT, 12)
    # GenAI stops at eos (id 2); ours was told not to
    assert len(theirs) == 12 or theirs[-1] == CONFIG["eos_token_id"], theirs
    assert theirs == ours.token_ids[: len(theirs)]
