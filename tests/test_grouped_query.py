"""The ort target's GroupQueryAttention lowering on tiny checkpoints whose head_dim the kernel
accepts (a multiple of 16): logits equal the fp32 functions graph on a left-padded batch, a
prefill then decode then batched multi-token continuation equals one pass, every KV cache
mode (the in-place shared one included) gives the functions graph's greedy tokens, and
blocks the kernel cannot take fall back to opset-23 Attention."""

import json
import shutil

import checkpoints
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from decoder_runner import Decoder, decided_steps, positions_for
from harness import assert_close

from graphattn import export
from graphattn.compiler import CompileOptions
from graphattn.compiler.files import compile_export
from graphattn.runtime import Generator, ModelSession, cuda_available

WIDE = {"hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 48}
GQA_MODELS = {
    "llama-gqa": checkpoints.llama_variant(**WIDE),
    "llama-mqa": checkpoints.llama_variant(**WIDE, num_key_value_heads=1),
    "llama-mha-tied": checkpoints.llama_variant(
        **WIDE, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "llama-llama3-rope-partial": checkpoints.llama_variant(
        **{**WIDE, "hidden_size": 128},  # head_dim 32, 16 rotary channels
        partial_rotary_factor=0.5,
        rope_scaling=checkpoints.LLAMA_VARIANTS["llama-llama3-rope"]["rope_scaling"],
    ),
    "mistral-window": checkpoints.llama_variant(
        **WIDE, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=3
    ),
    "qwen2-bias": checkpoints.llama_variant(
        **WIDE, model_type="qwen2", architectures=["Qwen2ForCausalLM"]
    ),
    "gpt2": {**checkpoints.GPT2, "n_embd": 64, "n_positions": 48},
}
PROMPTS = [[5, 17, 42, 8, 11, 60, 3], [40, 41], [7, 3, 90, 12]]
GQA_MODELS_CONTEXT = 48  # max_position_embeddings (n_positions for GPT-2)


def left_padded(rows):
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.fixture(scope="module", params=list(GQA_MODELS))
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gqa-{request.param}")
    checkpoints.write_checkpoint(root / "hf", {**GQA_MODELS[request.param]}, seed=5)
    export(root / "hf", root / "functions", target="functions", last_logits_only=False)
    export(root / "hf", root / "ort", target="ort", last_logits_only=False)  # for onnxruntime 1.30
    export(root / "hf", root / "ort132", target="ort", last_logits_only=False, ort_version="1.32")
    return request.param, root


def test_attention_becomes_grouped_query_attention(exported):
    name, root = exported
    graph = onnx.load(str(root / "ort" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2, ops
    assert "Attention" not in ops and "RotaryEmbedding" not in ops
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == int(name != "gpt2")
    assert len(gqa.input) <= 16  # onnxruntime 1.30 (the default --ort-version) takes 16 at most
    newer = onnx.load(str(root / "ort132" / "model.onnx"), load_external_data=False).graph
    assert all(len(n.input) == 17 for n in newer.node if n.op_type == "GroupQueryAttention")
    if name.startswith("llama"):  # packed q/k/v go in whole: no key/value inputs, no Split
        assert gqa.input[1] == gqa.input[2] == ""
    config = json.loads((root / "ort" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    # RoPE now follows the cache slot: only GPT-2's learned positions still read position_ids
    has_positions = "position_ids" in [i.name for i in graph.input]
    assert has_positions == (name == "gpt2")
    assert ("position_ids" in config["model"]["decoder"]["inputs"]) == has_positions


def test_left_padded_batch_equals_functions_graph(exported):
    name, root = exported
    ids, mask = left_padded(PROMPTS)
    expected, expected_presents = Decoder(root / "functions")(ids, mask)
    actual, presents = Decoder(root / "ort")(ids, mask)
    real = mask.astype(bool)
    assert_close(actual[real], expected[real].astype(np.float64), 1e-4, f"{name} logits")
    assert np.isfinite(actual).all()
    # values are not rotated: the cache holds the same values (keys differ by each row's
    # pad shift in their RoPE angle, which cancels in the scores)
    for (_, value), (_, expected_value) in zip(presents, expected_presents):
        for row, keep in enumerate(real):
            assert_close(value[row][:, keep], expected_value[row][:, keep], 1e-5, f"{name} v")


def test_prefill_decode_and_batched_continuation_equal_one_pass(exported):
    """onnxruntime 1.32's query_seqlens: a batch continues with several tokens in one call."""
    name, root = exported
    ids, mask = left_padded(PROMPTS)
    full, _ = Decoder(root / "functions")(ids, mask)
    decoder = Decoder(root / "ort132")
    first, past = decoder(ids[:, :3], mask[:, :3])
    second, past = decoder(ids[:, 3:4], mask[:, :4], past)  # one token
    third, _ = decoder(ids[:, 4:], mask, past)  # a batch of rows, several tokens, with a past
    steps = np.concatenate([first, second, third], axis=1)
    real = mask.astype(bool)
    assert_close(steps[real], full[real].astype(np.float64), 1e-4, name)


@pytest.mark.parametrize("cache", ["shared", "plain"])
def test_without_query_seqlens_the_runtime_continues_token_by_token(exported, cache):
    """The default (onnxruntime 1.30) graph refuses that call; our caches feed it one token
    per call and equal one pass."""
    name, root = exported
    ids, mask = left_padded(PROMPTS)
    full, _ = Decoder(root / "functions")(ids, mask)
    decoder = Decoder(root / "ort")
    _, past = decoder(ids[:, :4], mask[:, :4])
    with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1"):
        decoder(ids[:, 4:], mask, past)
    session = ModelSession(root / "ort", provider="cpu")
    runner = Generator(session, cache=cache, max_length=16).cache
    runner.reset(len(PROMPTS))
    positions = positions_for(mask, mask.shape[1])
    first = runner.step(ids[:, :4], mask[:, :4], positions[:, :4])
    rest = runner.step(ids[:, 4:], mask, positions[:, 4:])
    steps = np.concatenate([first, rest], axis=1)
    real = mask.astype(bool)
    assert_close(steps[real], full[real].astype(np.float64), 1e-4, name)


@pytest.mark.parametrize("cache", ["auto", "shared", "bound", "plain"])
def test_every_cache_mode_gives_the_functions_tokens(exported, cache):
    name, root = exported
    reference = Generator(root / "functions", provider="cpu", cache="plain")
    expected = reference.generate(PROMPTS, max_new_tokens=10, use_eos=False)
    generator = Generator(root / "ort", provider="cpu", cache=cache, max_length=24)
    assert generator.cache.name == ("shared" if cache == "auto" else cache)
    actual = generator.generate(PROMPTS, max_new_tokens=10, use_eos=False)
    assert [r.token_ids for r in actual] == [r.token_ids for r in expected]


def test_bare_onnx_file_reads_its_context_from_the_model(exported, tmp_path):
    _, root = exported
    for name in ("model.onnx", "model.onnx.data"):  # without genai_config.json beside them
        shutil.copy(root / "ort" / name, tmp_path / name)
    session = ModelSession(tmp_path / "model.onnx", provider="cpu")
    assert session.config.context_length == GQA_MODELS_CONTEXT
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Generator(session, max_length=GQA_MODELS_CONTEXT + 1)


def test_shared_cache_holds_the_plain_cache_values(exported):
    _, root = exported
    session = ModelSession(root / "ort", provider="cpu")
    shared = Generator(session, cache="shared", max_length=20)
    plain = Generator(session, cache="plain", max_length=20)
    prompt = [5, 17, 42, 8]
    assert (
        shared.generate(prompt, max_new_tokens=6, use_eos=False).token_ids
        == plain.generate(prompt, max_new_tokens=6, use_eos=False).token_ids
    )
    for layer in range(session.config.num_layers):
        key, value = shared.cache.layer(layer)
        assert_close(key, plain.cache.pasts[layer][0].astype(np.float64), 1e-6, "key")
        assert_close(value, plain.cache.pasts[layer][1].astype(np.float64), 1e-6, "value")


def test_export_option_keeps_attention(exported, tmp_path):
    _, root = exported
    export(root / "hf", tmp_path / "plain", target="ort", grouped_query=False)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "plain" / "model.onnx")).graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops
    assert Generator(tmp_path / "plain", provider="cpu").cache.name == "bound"


def test_compile_command_sets_the_shared_buffer_flag(exported, tmp_path):
    _, root = exported
    compile_export(root / "functions", tmp_path / "ort", CompileOptions("ort"))
    config = json.loads((tmp_path / "ort" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    compile_export(
        root / "functions", tmp_path / "plain", CompileOptions("ort", grouped_query=False)
    )
    config = json.loads((tmp_path / "plain" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False
    ops = {n.op_type for n in onnx.load(str(tmp_path / "plain" / "model.onnx")).graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops


@pytest.mark.parametrize(
    "config",
    [
        checkpoints.LLAMA,  # head_dim 8: not a multiple of 16
        checkpoints.llama_variant(**WIDE, partial_rotary_factor=0.5),  # 4 cos/sin columns
    ],
    ids=["head-dim-8", "rotary-width-4"],
)
def test_blocks_the_kernel_refuses_fall_back_to_attention(tmp_path, config):
    checkpoints.write_checkpoint(tmp_path / "hf", config, seed=5)
    export(tmp_path / "hf", tmp_path / "ort", target="ort")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "ort" / "model.onnx")).graph.node}
    assert "Attention" in ops and "GroupQueryAttention" not in ops
    generator = Generator(tmp_path / "ort", provider="cpu")
    assert generator.cache.name == "bound"
    with pytest.raises(ValueError, match="appends in place"):
        Generator(tmp_path / "ort", provider="cpu", cache="shared")


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDAExecutionProvider in this onnxruntime")
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_ort_graph_on_cuda_gives_the_functions_tokens(tmp_path, precision):
    checkpoints.write_checkpoint(tmp_path / "hf", GQA_MODELS["llama-gqa"], seed=5)
    export(tmp_path / "hf", tmp_path / "functions", target="functions", last_logits_only=False)
    export(tmp_path / "hf", tmp_path / "ort", target="ort", precision=precision)
    generator = Generator(tmp_path / "ort", provider="cuda", max_length=24)
    assert generator.model.device == "cuda"
    # fp16: the CUDA kernel appends in place; fp32: GQA falls back to the CPU provider
    assert generator.cache.name == ("shared" if precision == "fp16" else "bound")
    reference = Generator(tmp_path / "functions", provider="cpu")
    for prompt in PROMPTS:
        expected = reference.generate(prompt, max_new_tokens=8, use_eos=False).token_ids
        actual = generator.generate(prompt, max_new_tokens=8, use_eos=False).token_ids
        # fp16 may break a near-tie of the fp32 reference the other way: compare the steps
        # whose top-2 margin is clear of fp16's error (fp32: 1e-4)
        margin = 6e-2 if precision == "fp16" else 2e-4
        steps = decided_steps(tmp_path / "functions", prompt, expected, margin)
        assert actual[:steps] == expected[:steps], (prompt, steps)


def build_with_interleaved_rope(hf_dir, out_dir, target):
    """Export ``hf_dir`` with its RoPE switched to interleaved pairs (no registered
    architecture uses them, so the config is edited between the mapping and the builder)."""
    import dataclasses

    from graphattn.builder import build_decoder
    from graphattn.compiler import compile_model
    from graphattn.exporters.export import lazy_tensors, open_source, plan_weights, save_model
    from graphattn.exporters.genai_config import describe_graph, genai_config
    from graphattn.models import architecture_for

    source = open_source(hf_dir)
    architecture = architecture_for(source.config)
    cfg = architecture.config_from_hf(source.config)
    rope = dataclasses.replace(cfg.layers[0].attention.rope, interleaved=True)
    cfg = cfg.replace_attention(rope=rope)
    model = build_decoder(
        cfg, lazy_tensors(source, plan_weights(source, architecture, cfg), "fp32")
    )
    if target != "functions":
        compile_model(model, CompileOptions(target))
    out_dir.mkdir()
    save_model(model, out_dir)
    config = describe_graph(genai_config(cfg, "llama"), model)
    (out_dir / "genai_config.json").write_text(json.dumps(config))
    return model


def test_interleaved_rope_goes_into_the_kernel(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", GQA_MODELS["llama-gqa"], seed=5)
    build_with_interleaved_rope(tmp_path / "hf", tmp_path / "functions", "functions")
    model = build_with_interleaved_rope(tmp_path / "hf", tmp_path / "ort", "ort")
    gqa = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.attributes["rotary_interleaved"].value == 1 for n in gqa)
    ids, mask = left_padded(PROMPTS)
    expected, _ = Decoder(tmp_path / "functions")(ids, mask)
    actual, _ = Decoder(tmp_path / "ort")(ids, mask)
    real = mask.astype(bool)
    assert_close(actual[real], expected[real].astype(np.float64), 1e-4, "interleaved RoPE")
    # the switch mattered: split-halves RoPE gives other logits
    export(tmp_path / "hf", tmp_path / "halves", target="functions", last_logits_only=False)
    halves, _ = Decoder(tmp_path / "halves")(ids, mask)
    assert np.abs(halves[real] - expected[real]).max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_only_a_causal_mask_goes_to_the_always_causal_kernel(causal):
    from graphattn import ops
    from graphattn.compiler.grouped_query import _causal_window
    from graphattn.ops import GraphEmitter

    g = GraphEmitter("masks")
    mask = g.input("attention_mask", ir.DataType.INT64, ["batch", "total_sequence"])
    ids = g.input("input_ids", ir.DataType.INT64, ["batch", "sequence"])
    bias = ops.attention_bias(g, mask, ids, causal=causal, window=3 if causal else None)
    assert _causal_window(bias) == (3 if causal else None)  # None: the block keeps Attention
