"""Falcon (both decoder architectures) and MPT against Hugging Face (tiny random configs built
here): a left-padded batch, prefill then 4 decode steps, every target at fp32 (≤ 1e-4), the
NumPy witness, precisions, the ort lowering (rotary blocks become GroupQueryAttention, ALiBi
blocks keep Attention and say why) and the refused config keys.

Falcon's ALiBi configs are compared with transformers' SDPA path (its default for Falcon,
and the original RW code's math); its eager path adds the ALiBi bias twice (checked below)."""

import json

import families
import numpy as np
import numpy_forward
import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

BASE = {"vocab_size": 96, "bos_token_id": 1, "eos_token_id": 2}

# Old architecture, multi-query (one KV head), parallel attention + MLP on one norm, no
# biases, YaRN rotary whose original context (8) the prompt and decode steps cross.
FALCON_MQA_ROTARY = {
    **BASE,
    "model_type": "falcon",
    "architectures": ["FalconForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,  # head_dim 16
    "num_hidden_layers": 3,
    "new_decoder_architecture": False,
    "multi_query": True,
    "parallel_attn": True,
    "bias": False,
    "alibi": False,
    "max_position_embeddings": 32,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 5000.0,
        "factor": 3.0,
        "original_max_position_embeddings": 8,
    },
}
# Old architecture, multi-head (fused q/k/v grouped per head), sequential residual with
# post_attention_layernorm, biases, ALiBi with 6 heads (Bloom's extra slopes), odd FFN width.
FALCON_MHA_ALIBI = {
    **BASE,
    "model_type": "falcon",
    "architectures": ["FalconForCausalLM"],
    "hidden_size": 96,
    "num_attention_heads": 6,  # head_dim 16
    "num_hidden_layers": 2,
    "new_decoder_architecture": False,
    "multi_query": False,
    "parallel_attn": False,
    "bias": True,
    "alibi": True,
    "ffn_hidden_size": 80,
}
# New architecture (Falcon-40B): GQA 4 query heads on 2 KV heads, ln_attn / ln_mlp, biases,
# llama3 rotary scaling with a small original context.
FALCON_NEW_GQA = {
    **BASE,
    "model_type": "falcon",
    "architectures": ["FalconForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "num_hidden_layers": 2,
    "new_decoder_architecture": True,
    "num_ln_in_parallel_attn": 2,
    "bias": True,
    "alibi": False,
    "max_position_embeddings": 64,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}
# New architecture with one shared norm, a single KV head, ALiBi, untied head.
FALCON_NEW_ONE_NORM_ALIBI = {
    **BASE,
    "model_type": "falcon",
    "architectures": ["FalconForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_kv_heads": 1,
    "num_hidden_layers": 2,
    "new_decoder_architecture": True,
    "num_ln_in_parallel_attn": 1,
    "bias": False,
    "alibi": True,
    "tie_word_embeddings": False,
}

# MPT: 6 heads (MPT's slopes differ from Bloom's for non-powers of two), a clamp small enough
# to bite, an explicit softmax scale, no biases (LayerNorm without bias), tied head.
MPT = {
    **BASE,
    "model_type": "mpt",
    "architectures": ["MptForCausalLM"],
    "d_model": 96,
    "n_heads": 6,  # head_dim 16
    "n_layers": 2,
    "max_seq_len": 32,
    "no_bias": True,
    "attn_config": {"clip_qkv": 0.6, "softmax_scale": 0.4, "alibi": True, "alibi_bias_max": 8},
}
# no_bias=false (transformers' MPT writes no biases anyway), untied head, default scale.
MPT_UNTIED = {
    **BASE,
    "model_type": "mpt",
    "architectures": ["MptForCausalLM"],
    "d_model": 64,
    "n_heads": 4,
    "n_layers": 2,
    "max_seq_len": 32,
    "no_bias": False,
    "tie_word_embeddings": False,
}


@pytest.fixture
def sdpa_reference(monkeypatch):
    """HF's reference model on its SDPA path (Falcon's default; one ALiBi bias)."""
    original = families.hf_model

    def hf_model(config, **kw):
        model = original(config, **kw)
        model.config._attn_implementation = "sdpa"
        return model

    monkeypatch.setattr(families, "hf_model", hf_model)


def _architecture(config):
    from graphattn.models import architecture_for

    return architecture_for(config)


def test_numpy_knows_falcon_and_mpt():
    for config in (FALCON_MQA_ROTARY, FALCON_NEW_GQA, MPT):
        assert numpy_forward.knows(config)


def test_falcon_mqa_rotary_parallel(tmp_path):
    exports = families.check_family(tmp_path, FALCON_MQA_ROTARY)
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 3


def test_falcon_mha_alibi_sequential(tmp_path, sdpa_reference):
    exports = families.check_family(tmp_path, FALCON_MHA_ALIBI)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "ALiBi" in decisions[0]["reasons"]["GroupQueryAttention"]


def test_falcon_new_architecture_gqa(tmp_path):
    exports = families.check_family(tmp_path, FALCON_NEW_GQA)
    assert families.kernels(exports["ort"]) == ["GroupQueryAttention"] * 2
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_falcon_new_architecture_one_norm_alibi(tmp_path, sdpa_reference):
    exports = families.check_family(tmp_path, FALCON_NEW_ONE_NORM_ALIBI, targets=("ort",))
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "ALiBi" in decisions[1]["reasons"]["GroupQueryAttention"]


def test_falcon_eager_path_adds_alibi_twice(tmp_path):
    """transformers' eager Falcon adds the ALiBi bias in the mask and again on the scores;
    our NumPy forward with the bias counted twice matches it, once matches SDPA."""
    import numpy_forward_falcon_mpt as plugin
    import torch
    from decoder_runner import positions_for

    model = families.hf_model(FALCON_MHA_ALIBI)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = families.hf_weights(tmp_path)
    ids, mask = families.left_padded(families.PROMPTS)
    positions = positions_for(mask, ids.shape[1])
    real = mask[:, :, None].astype(bool)
    for implementation, times in (("eager", 2), ("sdpa", 1)):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            hf = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions),
            ).logits.double()
        for counted in (1, 2):
            plugin.ALIBI_TIMES["falcon"] = counted
            try:
                ours, _ = numpy_forward.forward(weights, config, ids, mask, positions)
            finally:
                plugin.ALIBI_TIMES["falcon"] = 1
            gap = float(np.abs(np.where(real, ours - hf.numpy(), 0)).max())
            assert (gap < 1e-4) == (counted == times), (implementation, counted, gap)


def test_falcon_alibi_slopes_fold_the_score_scale():
    cfg = _architecture(FALCON_MHA_ALIBI).config_from_hf(FALCON_MHA_ALIBI)
    attention = cfg.layers[0].attention
    assert attention.rope is None
    expected = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    assert np.allclose(np.array(attention.alibi_slopes) * 4.0, expected)  # sqrt(16) = 4


def test_falcon_slopes_round_to_bfloat16():
    from numpy_forward_falcon_mpt import round_bfloat16

    from graphattn.models.common import alibi_slopes
    from graphattn.models.falcon import falcon_alibi_slopes

    slopes = np.array(falcon_alibi_slopes(32, 64)) * 8.0
    assert np.array_equal(slopes, round_bfloat16(np.array(alibi_slopes(32), np.float32)))
    assert not np.array_equal(slopes, np.array(alibi_slopes(32)))


FALCON_REFUSED = [
    ({**FALCON_MQA_ROTARY, "num_ln_in_parallel_attn": 2}, "num_ln_in_parallel_attn=2"),
    ({**FALCON_NEW_GQA, "num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn=3"),
    ({**FALCON_NEW_GQA, "parallel_attn": False}, "parallel_attn=false"),
    ({**FALCON_MHA_ALIBI, "num_kv_heads": 2}, "num_kv_heads=2"),
    ({**FALCON_MQA_ROTARY, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({**FALCON_MQA_ROTARY, "activation": "tanh"}, "activation='tanh'"),
    (
        {**FALCON_MQA_ROTARY, "apply_residual_connection_post_layernorm": True},
        "apply_residual_connection_post_layernorm=True",
    ),
]


@pytest.mark.parametrize(("config", "message"), FALCON_REFUSED, ids=lambda v: str(v)[:40])
def test_falcon_refuses(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        _architecture(config).config_from_hf(config)
    assert "not supported" in str(error.value)


# ------------------------------------------------------------------------------------ MPT
def test_mpt_matches_transformers(tmp_path):
    exports = families.check_family(tmp_path, MPT)
    decisions = families.lowering(exports["ort"])
    assert [d["kernel"] for d in decisions] == ["Attention", "Attention"]
    assert "ALiBi" in decisions[0]["reasons"]["GroupQueryAttention"]
    families.check_precisions(tmp_path / "hf", tmp_path)


def test_mpt_clip_bites(tmp_path):
    """The clamp changes the logits (so the test above checks it)."""
    import torch

    model = families.hf_model(MPT)
    ids, mask = families.left_padded(families.PROMPTS)
    with torch.no_grad():
        clipped = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        for block in model.transformer.blocks:
            block.attn.clip_qkv = None
        free = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    assert float((clipped.logits - free.logits).abs().max()) > 1e-2


def test_mpt_untied_without_biases_in_checkpoint(tmp_path):
    families.check_family(tmp_path, MPT_UNTIED, targets=("portable",))


def test_mpt_biases_of_an_original_checkpoint(tmp_path):
    """no_bias=false: LayerNorm and projection biases (llm-foundry names) are read when the
    checkpoint has them; checked against the NumPy forward (transformers drops them)."""
    from decoder_runner import Decoder, positions_for
    from harness import assert_close
    from safetensors.numpy import save_file

    from graphattn import export

    hf_dir = tmp_path / "hf"
    families.hf_model(MPT_UNTIED).save_pretrained(hf_dir, safe_serialization=True)
    weights = families.hf_weights(hf_dir)
    rng = np.random.default_rng(0)
    c, f = 64, 256
    added = {"transformer.norm_f.bias": c}
    for i in range(2):
        p = f"transformer.blocks.{i}."
        added.update(
            {
                p + "norm_1.bias": c,
                p + "norm_2.bias": c,
                p + "attn.Wqkv.bias": 3 * c,
                p + "attn.out_proj.bias": c,
                p + "ffn.up_proj.bias": f,
                p + "ffn.down_proj.bias": c,
            }
        )
    for name, width in added.items():
        weights[name] = (0.2 * rng.standard_normal(width)).astype(np.float32)
    for path in hf_dir.glob("*.safetensors"):
        path.unlink()
    (hf_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(weights, str(hf_dir / "model.safetensors"))
    out = tmp_path / "portable"
    export(hf_dir, out, target="portable", last_logits_only=False)
    ids, mask = families.left_padded(families.PROMPTS)
    config = json.loads((hf_dir / "config.json").read_text())
    expected, _ = numpy_forward.forward(
        weights, config, ids, mask, positions_for(mask, ids.shape[1])
    )
    ours = Decoder(out)(ids, mask)[0].astype(np.float64)
    real = mask[:, :, None].astype(bool)
    assert_close(np.where(real, ours, 0), np.where(real, expected, 0), 1e-4, "biased mpt")
    without = {k: v for k, v in weights.items() if k not in added}
    plain, _ = numpy_forward.forward(without, config, ids, mask, positions_for(mask, ids.shape[1]))
    assert np.abs(np.where(real, plain - expected, 0)).max() > 1e-2


def test_mpt_slopes():
    """MPT's formula (odd-indexed slopes of the next power of two first) lands on Bloom's
    slopes for every head count at alibi_bias_max=8, up to float rounding."""
    from numpy_forward_falcon_mpt import mpt_slopes

    from graphattn.models.common import alibi_slopes
    from graphattn.models.mpt import mpt_alibi_slopes

    for heads in (1, 3, 5, 6, 8, 12, 24, 32, 40, 71):
        assert np.allclose(mpt_alibi_slopes(heads), mpt_slopes(heads), rtol=1e-12)
        assert np.allclose(mpt_alibi_slopes(heads), alibi_slopes(heads), rtol=1e-12)
    cfg = _architecture(MPT).config_from_hf(MPT)
    attention = cfg.layers[0].attention
    assert attention.scale == 0.4 and attention.clip_qkv == 0.6
    assert _architecture(MPT_UNTIED).config_from_hf(MPT_UNTIED).layers[0].attention.scale is None


def _attn(**changes):
    return {**MPT, "attn_config": {**MPT["attn_config"], **changes}}


MPT_REFUSED = [
    (_attn(alibi=False), "attn_config.alibi=False"),
    (_attn(alibi_bias_max=16), "attn_config.alibi_bias_max=16"),
    (_attn(qk_ln=True), "attn_config.qk_ln=True"),
    (_attn(qk_gn=True), "attn_config.qk_gn=True"),
    (_attn(prefix_lm=True), "attn_config.prefix_lm=True"),
    (_attn(attn_uses_sequence_id=True), "attn_config.attn_uses_sequence_id=True"),
    (_attn(attn_type="multiquery_attention"), "attn_config.attn_type='multiquery_attention'"),
    (_attn(rope=True), "attn_config.rope=True"),
    (_attn(sliding_window_size=4), "attn_config.sliding_window_size=4"),
    (_attn(kv_n_heads=2), "attn_config.kv_n_heads=2"),
    ({**MPT, "expansion_ratio": 2}, "expansion_ratio=2"),
    ({**MPT, "logit_scale": 0.5}, "logit_scale=0.5"),
    ({**MPT, "norm_type": "rmsnorm"}, "norm_type='rmsnorm'"),
    ({**MPT, "ffn_config": {"ffn_type": "te_ln_mlp"}}, "ffn_config="),
]


@pytest.mark.parametrize(("config", "message"), MPT_REFUSED, ids=lambda v: str(v)[-40:])
def test_mpt_refuses(config, message):
    with pytest.raises(ValueError, match=message) as error:
        _architecture(config).config_from_hf(config)
    assert "not supported" in str(error.value)
