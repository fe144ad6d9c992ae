"""The paged KV graph (``kv_layout="paged"``): the paged read and its bias against NumPy
references written here (loops over slots, no shared code) in onnxruntime and the NumPy
interpreter; whole tiny exports (Llama with GQA and RoPE, GPT-2 with learned positions, a
sliding-window Mistral) whose batched paged call over a shuffled pool equals the contiguous
export run on each row alone; the ort lowering; the refusals."""

import json
import math
import re
import subprocess

import checkpoints
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from old_runtime import OLD_PYTHON, needs_old_venv

from graphattn import export
from graphattn.builder import build_decoder
from graphattn.interpreter import Interpreter
from graphattn.models import architecture_for
from graphattn.ops import GraphEmitter
from graphattn.ops.paged import paged_attention_bias, paged_kv

ATOL = 1e-4
MASKED = -65504.0
BS = 4  # slots per block in the export tests: several blocks per row
# (past tokens in the pool, real new tokens): a prefill, a decode, a chunk that starts on a
# block boundary, a decode past several blocks
ROWS = [(0, 5), (7, 1), (16, 3), (21, 1)]
MODELS = {
    # head_dim 16: on ort the GroupQueryAttention rule would take it, were it not paged
    "llama": checkpoints.llama_variant(hidden_size=64, intermediate_size=64),
    "gpt2": checkpoints.GPT2,
    "mistral-window": checkpoints.LLAMA_VARIANTS["mistral-window"],  # sliding_window 3
}


# ------------------------------------------------------------------- NumPy references
def reference_read(pool: np.ndarray, table: np.ndarray) -> np.ndarray:
    """[B, Hkv, M·bs, D]: logical slot j of row b is slot j % bs of block table[b, j // bs]."""
    blocks, heads, bs, dim = pool.shape
    batch, width = table.shape
    out = np.zeros((batch, heads, width * bs, dim), pool.dtype)
    for b in range(batch):
        for j in range(width * bs):
            out[b, :, j, :] = pool[table[b, j // bs], :, j % bs, :]
    return out


def reference_bias(past, query, new_len, width, bs, causal=True, window=0) -> np.ndarray:
    """[B, 1, S, M·bs + S]: row b's query i (new slot i, left-padded) sees pool slot j when
    j < past[b], and new slot s when it is real; causal / windowed by logical position."""
    pool_len = width * bs
    out = np.full((len(past), 1, new_len, pool_len + new_len), MASKED, np.float32)
    for b in range(len(past)):
        pad = new_len - query[b]
        for i in range(new_len):
            q_pos = past[b] + i - pad
            for t in range(pool_len + new_len):
                if t < pool_len:
                    real, k_pos = t < past[b], t
                else:
                    s = t - pool_len
                    real, k_pos = s >= pad, past[b] + s - pad
                ok = real and (not causal or k_pos <= q_pos)
                if window:
                    ok = ok and abs(q_pos - k_pos) < window
                if ok:
                    out[b, 0, i, t] = 0.0
    return out


# ------------------------------------------------------------------ the two functions
def function_model(causal: int, window: int, bs: int):
    g = GraphEmitter("paged_functions")
    pool = g.input("pool", ir_float(), ["num_blocks", 2, bs, 3])
    table = g.input("block_table", ir_int(), ["batch", "max_blocks"])
    past = g.input("past_lengths", ir_int(), ["batch"])
    query = g.input("query_lengths", ir_int(), ["batch"])
    ids = g.input("input_ids", ir_int(), ["batch", "sequence"])
    read = paged_kv(g, pool, table, name="read")
    bias = paged_attention_bias(
        g, past, query, ids, table, block_size=bs, causal=bool(causal), window=window or None
    )
    g.output(read, "read", ir_float())
    g.output(bias, "bias", ir_float())
    return g.model()


def ir_float():
    import onnx_ir as ir

    return ir.DataType.FLOAT


def ir_int():
    import onnx_ir as ir

    return ir.DataType.INT64


@pytest.mark.parametrize(("causal", "window"), [(1, 0), (1, 3), (0, 0), (0, 5)])
def test_read_and_bias_match_numpy_in_ort_and_interpreter(causal, window):
    import onnx_ir as ir

    rng = np.random.default_rng(causal * 10 + window)
    bs, blocks = 3, 7
    pool = rng.standard_normal((blocks, 2, bs, 3)).astype(np.float32)
    table = rng.permutation(blocks)[:6].reshape(2, 3).astype(np.int64)
    table = np.concatenate([table, [[5, 1, 0]]])  # a row that repeats nothing, reuses ids
    past = np.array([7, 0, 4], np.int64)
    query = np.array([1, 4, 2], np.int64)
    feeds = {
        "pool": pool,
        "block_table": table,
        "past_lengths": past,
        "query_lengths": query,
        "input_ids": np.zeros((3, 4), np.int64),
    }
    expected_read = reference_read(pool, table)
    expected_bias = reference_bias(past, query, 4, 3, bs, bool(causal), window)
    model = function_model(causal, window, bs)
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    read, bias = session.run(["read", "bias"], feeds)
    np.testing.assert_array_equal(read, expected_read)
    np.testing.assert_array_equal(bias, expected_bias)
    interpreted = Interpreter(model).run(feeds)
    np.testing.assert_array_equal(interpreted["read"], expected_read)
    np.testing.assert_array_equal(interpreted["bias"], expected_bias)


def test_the_reference_bias_is_not_trivial():
    """The NumPy bias drops what it should (a check of the reference itself)."""
    bias = reference_bias([2], [2], 3, 1, 4, True, 0)[0, 0]
    keep = bias == 0
    # pool slots 0, 1 real (2, 3 past the length); new slot 0 is a pad
    assert keep[1].tolist() == [True, True, False, False, False, True, False]
    assert keep[2].tolist() == [True, True, False, False, False, True, True]
    assert not keep[0, 4] and not keep[0, 5]
    windowed = reference_bias([2], [2], 3, 1, 4, True, 2)[0, 0] == 0
    assert windowed[2].tolist() == [False, False, False, False, False, True, True]


# ---------------------------------------------------------------------- whole exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("paged")
    made = {}
    for name, config in MODELS.items():
        checkpoints.write_checkpoint(root / name / "hf", config, seed=5)
        targets = ("functions", "portable", "ort") if name == "llama" else ("portable", "ort")
        for target in targets:
            if target != "functions":
                out = root / name / f"{target}-contiguous"
                export(root / name / "hf", out, target=target, last_logits_only=False)
                made[name, target, "contiguous"] = out
            out = root / name / f"{target}-paged"
            export(
                root / name / "hf", out, target=target, last_logits_only=False,
                kv_layout="paged", kv_block_size=BS,
            )  # fmt: skip
            made[name, target, "paged"] = out
    return made


def session(directory):
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def run(sess, feeds):
    names = {i.name for i in sess.get_inputs()}
    outputs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return dict(zip([o.name for o in sess.get_outputs()], outputs))


def cache_shape(sess):
    key = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
    layers = sum(1 for i in sess.get_inputs() if i.name.endswith(".key"))
    return layers, key.shape[1], key.shape[3]


def alone(sess, tokens: np.ndarray, past: int):
    """Row ``tokens`` through the contiguous export by itself: prefill its first ``past``
    tokens, then the rest after that cache. Returns (past K/V per layer, logits of the new
    tokens [n, V], new K/V per layer [Hkv, n, D])."""
    layers, heads, dim = cache_shape(sess)
    names = [f"{i}.{n}" for i in range(layers) for n in ("key", "value")]
    cache = {f"past_key_values.{n}": np.zeros((1, heads, 0, dim), np.float32) for n in names}

    def step(ids, start):
        feeds = {
            "input_ids": ids[None],
            "attention_mask": np.ones((1, start + len(ids)), np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
            **cache,
        }
        return run(sess, feeds)

    if past:
        out = step(tokens[:past], 0)
        cache = {f"past_key_values.{n}": out[f"present.{n}"] for n in names}
    out = step(tokens[past:], past)
    pasts = {n: cache[f"past_key_values.{n}"][0] for n in names}
    new = {n: out[f"present.{n}"][0, :, past:, :] for n in names}
    return pasts, out["logits"][0], new


def paged_batch(sess, rows, rng, vocab, bs=BS, spare_entries=1):
    """Everything a paged call needs for ``rows`` [(past, new)], each row's past K/V taken
    from the contiguous session ``sess``, written into a shuffled pool of noise; the block
    table has ``spare_entries`` more columns than the longest past needs."""
    layers, heads, dim = cache_shape(sess)
    width = max(math.ceil(p / bs) for p, _ in rows) + spare_entries
    needed = [math.ceil(p / bs) for p, _ in rows]
    blocks = sum(needed) + 3  # spare blocks of noise that no row owns
    order = rng.permutation(blocks)
    table = rng.integers(0, blocks, size=(len(rows), width)).astype(np.int64)  # unused: any id
    start = 0
    for b, n in enumerate(needed):
        table[b, :n] = order[start : start + n]
        start += n
    names = [f"{i}.{n}" for i in range(layers) for n in ("key", "value")]
    pools = {n: rng.standard_normal((blocks, heads, bs, dim)).astype(np.float32) for n in names}
    new_len = max(n for _, n in rows)
    ids = np.zeros((len(rows), new_len), np.int64)
    positions = np.zeros_like(ids)
    expected = []
    for b, (past, new) in enumerate(rows):
        tokens = rng.integers(3, vocab, size=past + new).astype(np.int64)
        pasts, logits, new_kv = alone(sess, tokens, past)
        for n in names:
            for j in range(past):
                pools[n][table[b, j // bs], :, j % bs, :] = pasts[n][:, j, :]
        ids[b, new_len - new :] = tokens[past:]
        positions[b, new_len - new :] = np.arange(past, past + new)
        expected.append((logits, new_kv))
    feeds = {
        "input_ids": ids,
        "position_ids": positions,
        "block_table": table,
        "past_lengths": np.array([p for p, _ in rows], np.int64),
        "query_lengths": np.array([n for _, n in rows], np.int64),
        **{f"past_key_values.{n}": pools[n] for n in names},
    }
    return feeds, expected, names


def check_rows(out, expected, names, rows):
    new_len = out["logits"].shape[1]
    for b, ((_, new), (logits, new_kv)) in enumerate(zip(rows, expected)):
        np.testing.assert_allclose(out["logits"][b, new_len - new :], logits, rtol=0, atol=ATOL)
        for n in names:
            present = out[f"present.{n}"]
            assert present.shape[2] == new_len
            np.testing.assert_allclose(
                present[b, :, new_len - new :, :], new_kv[n], rtol=0, atol=ATOL
            )


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("name", list(MODELS))
def test_paged_batch_equals_each_row_alone(exports, name, target):
    contiguous = session(exports[name, target, "contiguous"])
    paged = session(exports[name, target, "paged"])
    rng = np.random.default_rng(len(name) * 7 + len(target))
    feeds, expected, names = paged_batch(contiguous, ROWS, rng, MODELS[name]["vocab_size"])
    out = run(paged, feeds)
    check_rows(out, expected, names, ROWS)
    assert np.isfinite(out["logits"]).all()  # pads attend something finite


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_a_batch_of_prefills_with_an_empty_block_table(exports, target):
    """max_blocks = 0: every row starts from nothing (the first step of a batch)."""
    rows = [(0, 4), (0, 2), (0, 5)]
    contiguous = session(exports["llama", target, "contiguous"])
    feeds, expected, names = paged_batch(
        contiguous, rows, np.random.default_rng(4), MODELS["llama"]["vocab_size"], spare_entries=0
    )
    assert feeds["block_table"].shape == (3, 0)
    check_rows(run(session(exports["llama", target, "paged"]), feeds), expected, names, rows)


def test_functions_graph_in_the_interpreter_equals_rows_alone(exports):
    contiguous = session(exports["llama", "portable", "contiguous"])
    rows = [(0, 3), (6, 1), (9, 2)]
    feeds, expected, names = paged_batch(
        contiguous, rows, np.random.default_rng(3), MODELS["llama"]["vocab_size"]
    )
    out = Interpreter(exports["llama", "functions", "paged"] / "model.onnx").run(feeds)
    check_rows(out, expected, names, rows)


def test_io_metadata_and_genai_config(exports):
    model = onnx.load(
        str(exports["llama", "ort", "paged"] / "model.onnx"), load_external_data=False
    )

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in model.graph.input}
    assert list(inputs)[:5] == [
        "input_ids", "position_ids", "block_table", "past_lengths", "query_lengths",
    ]  # fmt: skip
    assert "attention_mask" not in inputs
    assert inputs["block_table"] == ["batch_size", "max_blocks"]
    assert inputs["past_lengths"] == ["batch_size"]
    assert inputs["past_key_values.1.value"] == ["num_blocks", 2, BS, 16]
    outputs = {o.name: dims(o) for o in model.graph.output}
    assert outputs["present.0.key"] == ["batch_size", 2, "sequence_length", 16]
    assert outputs["logits"] == ["batch_size", "sequence_length", 96]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["graphattn.kv_layout"] == "paged"
    assert meta["graphattn.kv_block_size"] == str(BS)
    config = json.loads((exports["llama", "ort", "paged"] / "genai_config.json").read_text())
    assert config["graphattn.kv_layout"] == "paged"
    assert config["graphattn.onnxruntime_genai"].startswith("not supported: kv_layout paged")
    contiguous = json.loads(
        (exports["llama", "ort", "contiguous"] / "genai_config.json").read_text()
    )
    assert "graphattn.kv_layout" not in contiguous


def metadata(directory) -> dict[str, str]:
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def test_ort_lowering_declines_grouped_query_and_keeps_fusions(exports, tmp_path):
    model_dir = exports["llama", "ort", "paged"]
    lowering = json.loads(metadata(model_dir)["graphattn.lowering"])
    assert [d["kernel"] for d in lowering] == ["Attention", "Attention"]
    assert all("paged KV cache" in d["reasons"]["GroupQueryAttention"] for d in lowering)
    # the contiguous export of the same model does take GroupQueryAttention
    contiguous = onnx.load(
        str(exports["llama", "ort", "contiguous"] / "model.onnx"), load_external_data=False
    )
    assert any(n.op_type == "GroupQueryAttention" for n in contiguous.graph.node)
    # int4: the rest of the graph keeps the ort kernels
    out = tmp_path / "int4"
    export(
        model_dir.parent / "hf", out, target="ort", precision="int4",
        kv_layout="paged", kv_block_size=BS,
    )  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"MatMulNBits", "SkipSimplifiedLayerNormalization", "Attention"} <= ops
    assert "GroupQueryAttention" not in ops


def test_inspect_explain_says_why(exports, capsys):
    from graphattn.cli import main

    assert main(["inspect", str(exports["llama", "ort", "paged"]), "--explain"]) == 0
    text = capsys.readouterr().out
    assert "not GroupQueryAttention: paged KV cache" in text
    # the pool is described as a pool, and it costs per token what the contiguous cache does
    assert "kv_layout=paged" in text
    assert f"cache: paged pool, {BS}-token blocks" in text
    assert main(["inspect", str(exports["llama", "ort", "contiguous"])]) == 0
    contiguous = capsys.readouterr().out
    per_token = contiguous.split("cache: ")[1].split(" B/token")[0]
    assert f"{BS}-token blocks, {per_token} B/token" in text


def test_cli_export_flags(exports, tmp_path, capsys):
    from graphattn.cli import main

    hf = exports["gpt2", "portable", "paged"].parent / "hf"
    out = tmp_path / "cli"
    assert main(["export", str(hf), "-o", str(out), "--target", "portable", "--kv-layout",
                 "paged", "--quiet"]) == 0  # fmt: skip
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert metadata(out)["graphattn.kv_block_size"] == "16"  # the default
    dims = model.graph.input[-1].type.tensor_type.shape.dim
    assert dims[2].dim_value == 16
    # the default logits: the last position of each (left-padded) row, blocks of 16
    contiguous = session(exports["gpt2", "portable", "contiguous"])
    rows = [(0, 3), (18, 1), (33, 2)]
    feeds, expected, _ = paged_batch(
        contiguous, rows, np.random.default_rng(8), MODELS["gpt2"]["vocab_size"], bs=16
    )
    logits = run(session(out), feeds)["logits"]
    assert logits.shape == (3, 1, MODELS["gpt2"]["vocab_size"])
    for b, (row_logits, _) in enumerate(expected):
        np.testing.assert_allclose(logits[b, 0], row_logits[-1], rtol=0, atol=ATOL)


# -------------------------------------------------------------------------- refusals
DEEPSEEK = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 80,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "q_lora_rank": None,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
BLOOM = {
    "model_type": "bloom",
    "architectures": ["BloomForCausalLM"],
    "vocab_size": 96,
    "hidden_size": 32,
    "n_layer": 1,
    "n_head": 4,
    "layer_norm_epsilon": 1e-5,
}
SPARSE = checkpoints.llama_variant(
    head_dim=16,
    graphattn={
        "version": 1,
        "layer_attention": ["full_attention", "native_sparse"],
        "native_sparse": {"block_size": 3, "top_blocks": 2, "top_tokens": 4, "window": 3},
    },
)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (DEEPSEEK, "layer 0 is multi-head latent attention (MLA)"),
        (BLOOM, "layer 0 is ALiBi"),
        (SPARSE, "layer 1 is native sparse attention"),
    ],
)
def test_refused_layers_are_named(config, words):
    cfg = architecture_for(config).config_from_hf(config)
    with pytest.raises(ValueError, match=re.escape(words)):
        build_decoder(cfg, {}, kv_layout="paged")


def test_refused_options(exports, tmp_path):
    hf = exports["llama", "portable", "paged"].parent / "hf"
    with pytest.raises(ValueError, match="segment_ids"):
        export(hf, tmp_path / "a", kv_layout="paged", segment_ids=True)
    with pytest.raises(ValueError, match="transformers.js"):
        export(hf, tmp_path / "b", kv_layout="paged", layout="transformers.js")
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        export(hf, tmp_path / "c", kv_layout="blocks")
    with pytest.raises(ValueError, match="kv_block_size"):
        export(hf, tmp_path / "d", kv_layout="paged", kv_block_size=0)
    bert = tmp_path / "bert"
    bert.mkdir()
    config = {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 32,
        "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 16, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    }  # fmt: skip
    (bert / "config.json").write_text(json.dumps(config))
    checkpoints.write_safetensors(bert / "model.safetensors", {"x": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="encoder"):
        export(bert, tmp_path / "e", kv_layout="paged")


OLD_RUN = """
import sys, numpy as np, onnxruntime as ort
feeds = dict(np.load(sys.argv[2]))
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
out = s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()})
named = {o.name: v for o, v in zip(s.get_outputs(), out)}
np.savez(sys.argv[3], version=np.array(ort.__version__), **named)
"""


@needs_old_venv
def test_ort_paged_export_runs_in_onnxruntime_1_30(exports, tmp_path):
    """The ort paged graph loads in onnxruntime 1.30 (the npm version) and computes there what
    it computes here."""
    contiguous = session(exports["llama", "ort", "contiguous"])
    feeds, expected, names = paged_batch(
        contiguous, ROWS, np.random.default_rng(9), MODELS["llama"]["vocab_size"]
    )
    np.savez(tmp_path / "feeds.npz", **feeds)
    model = exports["llama", "ort", "paged"] / "model.onnx"
    done = subprocess.run(
        [str(OLD_PYTHON), "-c", OLD_RUN, str(model), str(tmp_path / "feeds.npz")]
        + [str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    old = dict(np.load(tmp_path / "out.npz"))
    assert str(old.pop("version")) == "1.30.0"
    check_rows(old, expected, names, ROWS)
    here = run(session(exports["llama", "ort", "paged"]), feeds)
    for name, value in old.items():
        np.testing.assert_allclose(value, here[name], rtol=0, atol=1e-6, err_msg=name)
