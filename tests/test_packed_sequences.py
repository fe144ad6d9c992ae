"""Packed sequences: the document functions against a NumPy loop reference (onnxruntime and the
interpreter), and decoders exported with ``segment_ids``: a packed prefill of 3 documents equals
each document alone (logits <= 1e-4 on every real position, targets functions/portable/ort),
and each continues (runtime ``generate_packed``, plain and bound caches) with the greedy
tokens it gets alone. Exports without the option keep their I/O.
"""

import itertools

import checkpoints
import numpy as np
import onnx
import pytest
from decoder_runner import Decoder, decided_steps
from harness import INT64, assert_close, build, run_both

from graphattn import export
from graphattn.cli import main
from graphattn.ops.documents import document_attention_bias, document_position_ids
from graphattn.ops.domain import MASKED_BIAS
from graphattn.runtime import Generator
from graphattn.runtime.packing import generate_packed, pack, prefill

# ------------------------------------------------------------------ the functions

# rows of segment ids over T = 9 slots (0 = pad): left pads, right pads, one document, four
ROWS = [
    [0, 0, 1, 1, 1, 2, 2, 3, 3],
    [1, 1, 1, 1, 2, 2, 0, 0, 0],
    [4, 4, 4, 4, 4, 4, 4, 4, 4],
    [7, 7, 3, 3, 3, 5, 9, 9, 9],
]


def reference(segments, mask, query_len, causal, window):
    """(keep [B, S, T] bool, positions [B, S]) by loops over the module docstring's rule."""
    batch, total = segments.shape
    keep = np.zeros((batch, query_len, total), dtype=bool)
    places = np.zeros((batch, query_len), dtype=np.int64)
    for b in range(batch):
        for i in range(query_len):
            q = total - query_len + i
            count = 0
            for t in range(total):
                mine = segments[b, t] == segments[b, q] and segments[b, t] != 0 and mask[b, t]
                ordered = t <= q or not causal
                near = window is None or abs(q - t) < window
                keep[b, i, t] = mine and ordered and near
                count += int(mine and t <= q)
            places[b, i] = max(count - 1, 0)
    return keep, places


CASES = list(itertools.product([1, 4, 9], [True, False], [None, 2], [False, True]))


@pytest.mark.parametrize(("query_len", "causal", "window", "holes"), CASES)
def test_document_functions_match_loop_reference(query_len, causal, window, holes):
    segments = np.array(ROWS, dtype=np.int64)
    mask = (segments > 0).astype(np.int64)
    if holes:  # attention_mask drops a slot that segment_ids keeps
        mask[1, 2] = mask[3, 6] = 0
    feeds = {
        "segment_ids": segments,
        "attention_mask": mask,
        "input_ids": np.zeros((len(ROWS), query_len), dtype=np.int64),
    }
    symbolic = {"segment_ids": ["B", "T"], "attention_mask": ["B", "T"], "input_ids": ["B", "S"]}

    def body(g, x):
        args = (g, x["segment_ids"], x["attention_mask"], x["input_ids"])
        bias = document_attention_bias(*args, causal=causal, window=window, name="bias")
        return {"bias": bias, "positions": (document_position_ids(*args, name="pos"), 2, INT64)}

    keep, places = reference(segments, mask, query_len, causal, window)
    expected = np.where(keep, 0.0, MASKED_BIAS)[:, None]
    for engine, out in zip(("ort", "interpreter"), run_both(build(body, feeds, symbolic), feeds)):
        assert_close(out["bias"], expected, 0.0, f"{engine} bias")
        assert out["positions"].dtype == np.int64
        np.testing.assert_array_equal(out["positions"], places, err_msg=f"{engine} positions")


def test_document_emitters_check_their_inputs():
    def emit(**changes):
        def body(g, x):
            args = {
                "segment_ids": x["segment_ids"],
                "attention_mask": x["attention_mask"],
                "input_ids": x["input_ids"],
            }
            args.update({k: x[v] for k, v in changes.pop("swap", {}).items()})
            return {
                "bias": document_attention_bias(
                    g, args["segment_ids"], args["attention_mask"], args["input_ids"], **changes
                )
            }

        ones = np.ones((1, 3), dtype=np.int64)
        feeds = {"segment_ids": ones, "attention_mask": ones, "input_ids": ones}
        feeds["x3"] = np.ones((1, 3, 1), dtype=np.int64)
        build(body, feeds)

    with pytest.raises(ValueError, match="window must be an int >= 1"):
        emit(window=0)
    with pytest.raises(ValueError, match="segment_ids must have rank 2"):
        emit(swap={"segment_ids": "x3"})


def test_pack_lays_out_documents():
    packed = pack([[5, 6, 7], [8], [9, 10]])
    np.testing.assert_array_equal(packed.input_ids, [[5, 6, 7, 8, 9, 10]])
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(packed.position_ids, [[0, 1, 2, 0, 0, 1]])
    assert packed.last_positions == [2, 3, 5]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack([[1], []])


# ------------------------------------------------------------------- the models

# head_dim 16: the ort target lowers the plain export to GroupQueryAttention, so declining
# the packed blocks is the document mask's doing
LLAMA = checkpoints.llama_variant(hidden_size=64, intermediate_size=96, vocab_size=300)
MODELS = {
    "llama": (LLAMA, ("functions", "portable", "ort")),
    "mistral-window": (
        checkpoints.llama_variant(
            model_type="mistral",
            architectures=["MistralForCausalLM"],
            sliding_window=3,
            vocab_size=300,
        ),
        ("portable",),
    ),
    "gpt2": ({**checkpoints.GPT2, "vocab_size": 300}, ("functions",)),
}
DOCUMENTS = [[5, 17, 42, 8, 99, 3], [40, 41, 250], [100, 7, 3, 250, 11, 12, 13, 77]]
NEW_TOKENS = 6
MARGIN = 1e-3


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{name: (plain export per target, packed export per target)}, all logits."""
    root = tmp_path_factory.mktemp("packed")
    made = {}
    for name, (config, targets) in MODELS.items():
        checkpoints.write_checkpoint(root / name / "hf", config, seed=5)
        plain, packed = {}, {}
        for target in targets:
            out = root / name / f"{target}-plain"
            export(root / name / "hf", out, target=target, last_logits_only=False)
            plain[target] = out
            out = root / name / f"{target}-packed"
            export(root / name / "hf", out, target=target, last_logits_only=False, segment_ids=True)
            packed[target] = out
        made[name] = (plain, packed)
    return root, made


def _inputs(out_dir):
    graph = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph
    return [v.name for v in graph.input]


@pytest.mark.parametrize(
    ("name", "target"), [(n, t) for n, (_, targets) in MODELS.items() for t in targets]
)
def test_packed_prefill_equals_each_document_alone(exports, name, target):
    _, made = exports
    plain, packed = made[name]
    generator = Generator(packed[target], provider="cpu", cache="plain")
    logits = prefill(generator, pack(DOCUMENTS))
    alone = Decoder(plain[target])
    start = 0
    for index, document in enumerate(DOCUMENTS):
        ids = np.array([document])
        expected, _ = alone(ids, np.ones_like(ids))
        got = logits[:, start : start + len(document)]
        assert_close(got, expected.astype(np.float64), 1e-4, f"{name}/{target} document {index}")
        start += len(document)


@pytest.mark.parametrize(
    ("name", "target", "cache"),
    [("llama", "ort", "plain"), ("llama", "portable", "bound"), ("mistral-window", "portable",
     "bound"), ("gpt2", "functions", "plain")],
)  # fmt: skip
def test_packed_documents_continue_like_each_alone(exports, name, target, cache):
    _, made = exports
    plain, packed = made[name]
    reference = Generator(plain[target], provider="cpu", cache="plain")
    expected = []
    for document in DOCUMENTS:
        tokens = reference.generate(document, max_new_tokens=NEW_TOKENS, use_eos=False).token_ids
        # every step decided by more than MARGIN: no near-tie the packed run could break
        assert decided_steps(plain[target], document, tokens, MARGIN) == NEW_TOKENS, document
        expected.append(tokens)
    generator = Generator(packed[target], provider="cpu", cache=cache)
    results = generate_packed(generator, DOCUMENTS, max_new_tokens=NEW_TOKENS, use_eos=False)
    assert [r.token_ids for r in results] == expected
    # the packed graph also runs an ordinary left-padded batch (segment_ids = attention_mask)
    batch = generator.generate(DOCUMENTS, max_new_tokens=NEW_TOKENS, use_eos=False)
    assert [r.token_ids for r in batch] == expected


def test_packed_sampling_follows_the_batch_sampler(exports):
    _, made = exports
    plain, packed = made["llama"]
    sampled = dict(max_new_tokens=NEW_TOKENS, temperature=0.7, top_k=50, seed=3, use_eos=False)
    batch = Generator(plain["portable"], provider="cpu").generate(DOCUMENTS, **sampled)
    generator = Generator(packed["portable"], provider="cpu", cache="plain")
    again = generate_packed(generator, DOCUMENTS, **sampled)
    assert [r.token_ids for r in again] == [r.token_ids for r in batch]


def test_io_with_and_without_segment_ids(exports):
    _, made = exports
    plain, packed = made["llama"]
    pasts = [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    for target in ("functions", "portable"):
        assert _inputs(plain[target]) == ["input_ids", "attention_mask", "position_ids", *pasts]
        assert _inputs(packed[target]) == ["input_ids", "attention_mask", "segment_ids", *pasts]
        functions = {f.name for f in onnx.load(str(plain[target] / "model.onnx")).functions}
        assert not any(f.startswith("Document") for f in functions), functions
    # ort: the plain graph takes GroupQueryAttention (no position_ids), the packed one declines it
    assert _inputs(plain["ort"]) == ["input_ids", "attention_mask", *pasts]
    assert _inputs(packed["ort"]) == ["input_ids", "attention_mask", "segment_ids", *pasts]
    for directory, has_kernel in ((plain["ort"], True), (packed["ort"], False)):
        nodes = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph.node
        assert ("GroupQueryAttention" in {n.op_type for n in nodes}) == has_kernel, directory
    model = onnx.load(str(packed["ort"] / "model.onnx"), load_external_data=False)
    lowering = {p.key: p.value for p in model.metadata_props}["graphattn.lowering"]
    assert "packed documents (segment_ids)" in lowering


def test_cli_segment_ids_and_refusals(exports, tmp_path, capsys):
    root, made = exports
    out = tmp_path / "cli"
    code = main(["export", str(root / "llama" / "hf"), "-o", str(out), "--target", "portable",
                 "--segment-ids", "--quiet"])  # fmt: skip
    assert code == 0
    assert "segment_ids" in _inputs(out)
    with pytest.raises(ValueError, match="logits for every position"):
        generate_packed(Generator(out, provider="cpu", cache="plain"), DOCUMENTS)
    plain, _ = made["llama"]
    with pytest.raises(ValueError, match="export with --segment-ids"):
        generate_packed(Generator(plain["portable"], provider="cpu", cache="plain"), DOCUMENTS)


@pytest.mark.hf
def test_alibi_documents_packed_equal_each_alone(tmp_path):
    """Bloom (ALiBi, 6 heads): the per-row key positions of the ALiBi bias differ from the
    document positions by one constant per query, which the softmax ignores."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    import families

    config = {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "vocab_size": 300,
        "hidden_size": 48,
        "n_layer": 2,
        "n_head": 6,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    families.hf_model(config, seed=2).save_pretrained(tmp_path / "hf", safe_serialization=True)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    export(tmp_path / "hf", plain, target="portable", last_logits_only=False)
    export(tmp_path / "hf", packed, target="portable", last_logits_only=False, segment_ids=True)
    generator = Generator(packed, provider="cpu", cache="plain")
    logits, start = prefill(generator, pack(DOCUMENTS)), 0
    reference = Generator(plain, provider="cpu", cache="plain")
    expected = []
    for index, document in enumerate(DOCUMENTS):
        ids = np.array([document])
        alone, _ = Decoder(plain)(ids, np.ones_like(ids))
        got = logits[:, start : start + len(document)]
        assert_close(got, alone.astype(np.float64), 1e-4, f"bloom document {index}")
        start += len(document)
        tokens = reference.generate(document, max_new_tokens=NEW_TOKENS, use_eos=False).token_ids
        assert decided_steps(plain, document, tokens, MARGIN) == NEW_TOKENS, document
        expected.append(tokens)
    results = generate_packed(generator, DOCUMENTS, max_new_tokens=NEW_TOKENS, use_eos=False)
    assert [r.token_ids for r in results] == expected


def test_sparse_layers_refuse_segment_ids():
    from types import SimpleNamespace

    from graphattn.packing import check_packable

    layer = SimpleNamespace(attention=SimpleNamespace(sparse=SimpleNamespace(kind="native_sparse")))
    dense = SimpleNamespace(attention=SimpleNamespace(sparse=None))
    check_packable(SimpleNamespace(layers=[dense]))
    with pytest.raises(ValueError, match="layer 1 is native_sparse attention"):
        check_packable(SimpleNamespace(layers=[dense, layer]))
