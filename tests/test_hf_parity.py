"""Parity with Hugging Face transformers (the optional ``hf`` extra): tiny random models built
from a config in the test — no download — saved with save_pretrained (sharded safetensors),
exported, and compared on logits and the KV cache (max abs <= 1e-4)."""

import checkpoints
import numpy as np
import pytest
from decoder_runner import Decoder, positions_for
from harness import assert_close

from graphattn import export

torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

pytestmark = pytest.mark.hf
ATOL = 1e-4
CASES = [
    "gpt2",
    "gpt2-untied",
    "llama-gqa",
    "llama-mha-tied",
    "llama-mqa",
    "llama-llama3-rope",
    "llama-odd-head-dim-bias",
    "mistral-window",
    "qwen2-bias",
]


def hf_model(config: dict):
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and ("norm" in name or "ln_" in name):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.2 * torch.randn_like(parameter))
    return model.eval()


def cache_pairs(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return list(cache.to_legacy_cache())
    return list(cache)


@pytest.mark.parametrize("case", CASES)
def test_logits_and_cache_match_transformers(tmp_path, case):
    config = checkpoints.ALL_VARIANTS[case]
    model = hf_model(config)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded
    export(tmp_path / "hf", tmp_path / "onnx", last_logits_only=False)

    rng = np.random.default_rng(2)
    ids = rng.integers(3, config["vocab_size"], size=(3, 7))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    positions = positions_for(mask, ids.shape[1])
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            use_cache=True,
        )
    logits, presents = Decoder(tmp_path / "onnx")(ids, mask)
    real = mask[:, :, None].astype(bool)
    expected = out.logits.double().numpy()
    assert_close(np.where(real, logits, 0), np.where(real, expected, 0), ATOL, f"{case} logits")
    real_kv = mask[:, None, :, None].astype(bool)
    for i, (ours, theirs) in enumerate(zip(presents, cache_pairs(out.past_key_values))):
        for part, mine, hf in zip(("key", "value"), ours, theirs):
            # HF's sliding-window cache keeps only the newest positions: compare those.
            kept = hf.shape[2]
            expected_cache = hf.double().numpy()
            keep = real_kv[:, :, -kept:]
            actual = mine[:, :, -kept:]
            assert_close(
                np.where(keep, actual, 0), np.where(keep, expected_cache, 0), ATOL, f"{part} {i}"
            )
