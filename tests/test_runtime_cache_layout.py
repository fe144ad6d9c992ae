"""The runtime over per-layer caches that are not ``[B, Hkv, T, D]``: a synthetic decoder built
here with onnx.helper whose layers cache tensors of different names, ranks and time axes
(``[B, T, R]`` like an MLA latent, ``[B, 2, T, 3]``, ordinary key/value), and whose logits are
computable in NumPy: every cache tensor of a token is an embedding row, and

    logits[b, s] = sum over layers/tensors of  sum_{t <= s, mask[b, t] = 1} E_i[id_t] @ W_i

(a causal, padding-masked running sum through each cache). Greedy and sampled generation with
the plain and bound caches, left-padded batches, prefill + decode against one pass, the
shared-cache refusal, ``inspect``'s cache report and genai_config's cache names."""

import json

import numpy as np
import onnx
import pytest
import tiny_tokenizer
from onnx import TensorProto, helper, numpy_helper

from graphattn.runtime import Generator, ModelSession
from graphattn.runtime.generate import positions

VOCAB = 300
# per layer: (name, dims) with "B" batch and "T" time, like the graph's inputs
LATENT_LAYERS = (
    (("latent", ("B", "T", 4)), ("rope_key", ("B", "T", 2))),
    (("state", ("B", 2, "T", 3)),),
    (("key", ("B", 2, "T", 3)), ("value", ("B", 2, "T", 3))),
)
ORDINARY_LAYERS = (
    (("key", ("B", 2, "T", 3)), ("value", ("B", 2, "T", 3))),
    (("key", ("B", 2, "T", 3)), ("value", ("B", 2, "T", 3))),
)
DIM_NAMES = {"B": "batch_size", "T": "past_sequence_length"}


def make_weights(layers, seed: int) -> dict[str, np.ndarray]:
    """Per cache tensor ``{layer}.{name}``: embedding ``E [V, width]`` and ``W [width, V]``."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, tensors in enumerate(layers):
        for name, dims in tensors:
            width = int(np.prod([d for d in dims if isinstance(d, int)]))
            weights[f"{i}.{name}.E"] = rng.standard_normal((VOCAB, width)).astype(np.float32)
            weights[f"{i}.{name}.W"] = rng.standard_normal((width, VOCAB)).astype(np.float32)
    return weights


def build_decoder(layers, weights) -> onnx.ModelProto:
    """The synthetic decoder: ``input_ids [B, S]``, ``attention_mask [B, T + S]``, per layer
    ``past_key_values.{i}.<name>`` → ``present.{i}.<name>`` (Concat on the time axis),
    ``logits [B, S, V]``."""
    nodes, inits = [], []
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "seq"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "seq", VOCAB])
    ]

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    const("axis1", np.array(1, np.int64))
    const("minus_one", np.array([-1], np.int64))
    const("big", np.array([1 << 62], np.int64))
    const("one_axis", np.array([1], np.int64))
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "minus_one"], ["mask_BT1"]),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Slice", ["ids_shape", "one_axis", "big"], ["seq_len"]),
        helper.make_node("Neg", ["seq_len"], ["minus_seq"]),
    ]
    terms = []
    for i, tensors in enumerate(layers):
        for name, dims in tensors:
            key = f"{i}.{name}"
            time_axis = dims.index("T")
            fixed = [d for d in dims if isinstance(d, int)]
            width = int(np.prod(fixed))
            graph_dims = [DIM_NAMES.get(d, d) for d in dims]
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{name}", TensorProto.FLOAT, graph_dims
                )
            )
            present_dims = [
                "total_sequence_length" if d == "T" else DIM_NAMES.get(d, d) for d in dims
            ]
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{name}", TensorProto.FLOAT, present_dims
                )
            )
            table = const(f"{key}.E", weights[f"{key}.E"])
            out_weight = const(f"{key}.W", weights[f"{key}.W"])
            nodes.append(helper.make_node("Gather", [table, "input_ids"], [f"{key}.new_BSW"]))
            # new [B, S, width] → the cache layout (time at time_axis), and back for the sum
            shape_bs = const(f"{key}.shape_in", np.array([0, 0, *fixed], np.int64))
            nodes.append(
                helper.make_node("Reshape", [f"{key}.new_BSW", shape_bs], [f"{key}.new_BS_"])
            )
            order = [0, *range(2, 1 + time_axis), 1, *range(1 + time_axis, len(dims))]
            nodes.append(
                helper.make_node("Transpose", [f"{key}.new_BS_"], [f"{key}.new"], perm=order)
            )
            nodes.append(
                helper.make_node(
                    "Concat",
                    [f"past_key_values.{i}.{name}", f"{key}.new"],
                    [f"present.{i}.{name}"],
                    axis=time_axis,
                )
            )
            back = [order.index(a) for a in range(len(dims))]
            nodes.append(
                helper.make_node(
                    "Transpose", [f"present.{i}.{name}"], [f"{key}.all_BT_"], perm=back
                )
            )
            shape_bt = const(f"{key}.shape_out", np.array([0, 0, width], np.int64))
            nodes += [
                helper.make_node("Reshape", [f"{key}.all_BT_", shape_bt], [f"{key}.all_BTW"]),
                helper.make_node("Mul", [f"{key}.all_BTW", "mask_BT1"], [f"{key}.masked"]),
                helper.make_node("CumSum", [f"{key}.masked", "axis1"], [f"{key}.running"]),
                helper.make_node(
                    "Slice", [f"{key}.running", "minus_seq", "big", "one_axis"], [f"{key}.last"]
                ),
                helper.make_node("MatMul", [f"{key}.last", out_weight], [f"{key}.logits"]),
            ]
            terms.append(f"{key}.logits")
    nodes.append(helper.make_node("Sum", terms, ["logits"]))
    graph = helper.make_graph(nodes, "synthetic_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def reference_logits(layers, weights, ids: list[int]) -> np.ndarray:
    """float64 logits ``[S, V]`` of one unpadded row, from the definition above."""
    total = np.zeros((len(ids), VOCAB))
    for i, tensors in enumerate(layers):
        for name, _ in tensors:
            rows = weights[f"{i}.{name}.E"].astype(np.float64)[ids]
            total += np.cumsum(rows, axis=0) @ weights[f"{i}.{name}.W"].astype(np.float64)
    return total


def reference_greedy(layers, weights, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens, re-running the whole text each step; asserts each choice is decided
    (top-2 margin > 1e-3) so float32 cannot pick differently."""
    ids = list(prompt)
    for _ in range(steps):
        last = reference_logits(layers, weights, ids)[-1]
        top2 = np.sort(last)[-2:]
        assert top2[1] - top2[0] > 1e-3, "near-tie in the reference: pick another seed"
        ids.append(int(last.argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module", params=["latent", "ordinary"])
def decoder(request, tmp_path_factory):
    layers = LATENT_LAYERS if request.param == "latent" else ORDINARY_LAYERS
    weights = make_weights(layers, seed=3)
    directory = tmp_path_factory.mktemp(f"cache-{request.param}")
    onnx.save(build_decoder(layers, weights), str(directory / "model.onnx"))
    tiny_tokenizer.write_tokenizer(directory, VOCAB)
    return layers, weights, directory / "model.onnx"


PROMPTS = ([5, 17, 42, 8, 99], [250, 3], [7, 7, 120])


def test_layout_read_from_the_graph(decoder):
    layers, _, path = decoder
    model = ModelSession(path, provider="cpu")
    assert len(model.cache_layout) == len(layers)
    for tensors, expected in zip(model.cache_layout, layers):
        assert [t.name for t in tensors] == [name for name, _ in expected]
        for t, (_, dims) in zip(tensors, expected):
            assert t.time_axis == dims.index("T") and t.batch_axis == 0
            assert t.shape(2, 5) == tuple(2 if d == "B" else 5 if d == "T" else d for d in dims)
    widths = sum(
        int(np.prod([d for d in dims if isinstance(d, int)])) for t in layers for _, dims in t
    )
    assert model.cache_bytes_per_token == 4 * widths
    assert not model.shares_kv_buffer


@pytest.mark.parametrize("cache", ["plain", "bound"])
def test_greedy_matches_numpy(decoder, cache):
    layers, weights, path = decoder
    generator = Generator(path, provider="cpu", cache=cache, max_length=32)
    for prompt in PROMPTS:
        result = generator.generate(prompt, max_new_tokens=6, use_eos=False)
        assert result.token_ids == reference_greedy(layers, weights, prompt, 6)


@pytest.mark.parametrize("cache", ["plain", "bound"])
def test_left_padded_batch_equals_each_prompt_alone(decoder, cache):
    layers, weights, path = decoder
    generator = Generator(path, provider="cpu", cache=cache, max_length=32)
    batch = generator.generate(list(PROMPTS), max_new_tokens=6, use_eos=False)
    for prompt, result in zip(PROMPTS, batch):
        assert result.token_ids == reference_greedy(layers, weights, prompt, 6)
    sampled = [
        Generator(path, provider="cpu", cache=c, max_length=32).generate(
            list(PROMPTS), max_new_tokens=6, temperature=0.8, top_k=20, seed=5, use_eos=False
        )
        for c in ("plain", "bound")
    ]
    assert [r.token_ids for r in sampled[0]] == [r.token_ids for r in sampled[1]]


def test_prefill_plus_decode_equals_one_pass(decoder):
    layers, weights, path = decoder
    ids = np.array([[0, 0, 4, 9, 16, 25, 36, 49], [1, 2, 3, 5, 8, 13, 21, 34]], np.int64)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    whole = Generator(path, provider="cpu", cache="plain", max_length=16).cache
    whole.reset(2)
    one_pass = whole.step(ids, mask, positions(mask, ids.shape[1]))
    for row in range(2):
        real = mask[row].astype(bool)
        expected = reference_logits(layers, weights, ids[row, real].tolist())
        np.testing.assert_allclose(one_pass[row, real], expected, atol=1e-4, rtol=0)
    for mode in ("plain", "bound"):
        cache = Generator(path, provider="cpu", cache=mode, max_length=16).cache
        cache.reset(2)
        pieces, start = [cache.step(ids[:, :4], mask[:, :4], positions(mask[:, :4], 4))], 4
        for end in (6, 7, 8):  # a chunk of two, then single tokens
            new = end - start
            pieces.append(
                cache.step(ids[:, start:end], mask[:, :end], positions(mask[:, :end], new))
            )
            start = end
        np.testing.assert_allclose(np.concatenate(pieces, axis=1), one_pass, atol=1e-5, rtol=0)
        held = cache.pasts if mode == "plain" else [cache.layer(i) for i in range(len(layers))]
        for layer, tensors in enumerate(whole.pasts):
            for got, expected in zip(held[layer], tensors, strict=True):
                np.testing.assert_array_equal(got, expected)


def test_streaming_equals_generate(decoder):
    _, _, path = decoder
    generator = Generator(path, provider="cpu", cache="bound", max_length=32)
    text = generator.generate(PROMPTS[0], max_new_tokens=6, use_eos=False).text
    assert "".join(generator.stream(PROMPTS[0], max_new_tokens=6, use_eos=False)) == text


def test_shared_cache_is_refused(decoder):
    _, _, path = decoder
    with pytest.raises(ValueError, match="cache 'shared' needs"):
        Generator(path, provider="cpu", cache="shared", max_length=16)


def test_genai_config_and_inspect_describe_the_cache(decoder, tmp_path):
    import onnx_ir as ir

    from graphattn.exporters.genai_config import describe_graph
    from graphattn.inspect import describe

    layers, weights, path = decoder
    out = tmp_path / "export"
    out.mkdir()
    proto = onnx.load(str(path))
    onnx.save(proto, str(out / "model.onnx"))
    config = describe_graph(
        {
            "model": {
                "type": "synthetic",
                "vocab_size": VOCAB,
                "context_length": 32,
                "eos_token_id": 2,
                "decoder": {
                    "filename": "model.onnx",
                    "num_hidden_layers": len(layers),
                    "num_key_value_heads": 2,
                    "head_size": 3,
                    "hidden_size": 8,
                    "num_attention_heads": 2,
                },
            }
        },
        ir.serde.deserialize_model(proto),
    )
    (out / "genai_config.json").write_text(json.dumps(config))
    latent = layers is LATENT_LAYERS
    assert ("graphattn.cache_inputs" in config) == latent
    if latent:
        assert config["graphattn.cache_inputs"].startswith("past_key_values.0.latent")
        assert "not supported" in config["graphattn.onnxruntime_genai"]
        assert all(isinstance(v, str) for k, v in config.items() if k.startswith("graphattn."))
    model = ModelSession(out, provider="cpu")  # the runtime reads the file it wrote
    assert [len(t) for t in model.cache_layout] == [len(t) for t in layers]
    report = describe(out)
    first = layers[0][0][0]
    assert f"past_key_values.{{i}}.{first}" in report
    assert f"cache: {model.cache_bytes_per_token} B/token" in report
    if latent:
        assert "latent [batch, T, 4] float32 (16 B/token)" in report
        assert "state [batch, 2, T, 3] float32 (24 B/token)" in report


def test_transformersjs_layout_refuses_latent_caches(decoder):
    from types import SimpleNamespace

    from graphattn.exporters.transformersjs_layout import check_supported

    layers, _, path = decoder
    proto = onnx.load(str(path))
    if layers is LATENT_LAYERS:
        with pytest.raises(ValueError, match=r"latent attention cache .*latent\|rope_key\|state"):
            check_supported(SimpleNamespace(latent=False), proto)
    else:
        check_supported(SimpleNamespace(latent=False), proto)
    with pytest.raises(ValueError, match="transformers.js feeds only past_key_values"):
        check_supported(SimpleNamespace(latent=True))


DEEPSEEK_V2 = {  # tiny DeepSeek-V2: low-rank query, MLA cache of 32 + 8 values per token
    "model_type": "deepseek_v2",
    "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 2,  # dense MLPs: no routing near-ties to control here
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def deepseek_export(tmp_path_factory):
    import families

    from graphattn import export

    root = tmp_path_factory.mktemp("deepseek-runtime")
    families.hf_model(DEEPSEEK_V2).save_pretrained(root / "hf", safe_serialization=True)
    export(root / "hf", root / "portable", target="portable")
    return root / "portable"


def test_generator_on_a_latent_cache_export(deepseek_export):
    from decoder_runner import Decoder

    model = ModelSession(deepseek_export, provider="cpu")
    assert [[(t.name, t.dims, t.time_axis) for t in layer] for layer in model.cache_layout] == [
        [("latent", (None, None, 32), 1), ("rope_key", (None, None, 8), 1)]
    ] * 2
    assert model.cache_bytes_per_token == 2 * (32 + 8) * 4 and not model.shares_kv_buffer
    prompts = [[5, 17, 42, 8, 11], [40, 41], [7, 3, 90]]
    decoder, expected = Decoder(deepseek_export), []
    for prompt in prompts:  # greedy by re-running the whole text, every choice decided
        ids = list(prompt)
        for _ in range(4):
            array = np.array([ids])
            last = decoder(array, np.ones_like(array))[0][0, -1].astype(np.float64)
            top2 = np.sort(last)[-2:]
            assert top2[1] - top2[0] > 1e-3, "near-tie: pick other prompts"
            ids.append(int(last.argmax()))
        expected.append(ids[len(prompt) :])
    for cache in ("plain", "bound"):
        generator = Generator(model, cache=cache, max_length=16)
        batch = generator.generate(prompts, max_new_tokens=4, use_eos=False)
        assert [r.token_ids for r in batch] == expected, cache
