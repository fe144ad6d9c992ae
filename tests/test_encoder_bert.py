"""BERT encoder export: a tiny random BertModel built here (no download), saved as safetensors,
exported on every target; a right-padded batch of 3 rows must match HF eager and an
independent float64 NumPy forward on the real tokens, the pooled output the NumPy mean-pool
of HF's; the functions graph also runs in the NumPy interpreter; ``graphattn embed`` prints
the embeddings of texts tokenized by the export's tokenizer. Each layer's attention is one
``graphattn.EncoderSelfAttention_*`` call in the functions graph, one opset-23 ``Attention``
on portable/ort, and one recorded lowering decision (``inspect --explain``).
"""

import json

import numpy as np
import numpy_forward_bert as forward
import onnx
import onnxruntime as ort
import pytest
import tiny_wordpiece
from harness import assert_close

from graphattn import cli
from graphattn.exporters.export import export
from graphattn.exporters.safetensors_reader import CheckpointError
from graphattn.inspect import describe
from graphattn.interpreter import Interpreter
from graphattn.ops import GraphEmitter
from graphattn.ops.encoder import bidirectional_bias, sentence_embedding
from graphattn.ops.encoder_block import encoder_attention_block
from graphattn.spec import LOWERING_KEY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
}
LENGTHS = (7, 4, 2)  # right padding: 0, 3 and 5 pads
ATOL = 1e-4


def _batch():
    rng = np.random.default_rng(7)
    length = max(LENGTHS)
    ids = rng.integers(5, CONFIG["vocab_size"], (3, length)).astype(np.int64)
    mask = np.array([[1] * n + [0] * (length - n) for n in LENGTHS], np.int64)
    types = np.array(
        [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]], np.int64
    )
    ids[mask == 0] = 0  # [PAD]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, HF model, state dict as NumPy) of a random BertModel with random norms."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**CONFIG, architectures=["BertModel"])
    config._attn_implementation = "eager"
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                parameter.copy_(parameter + 0.2 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("bert")
    model.save_pretrained(directory)
    tiny_wordpiece.write_tokenizer(directory)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    return directory, model, weights


@pytest.fixture(scope="module")
def hf_hidden(checkpoint):
    _, model, _ = checkpoint
    feeds = {k: torch.tensor(v) for k, v in _batch().items()}
    with torch.no_grad():
        return model(**feeds).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    """target → export directory (fp32, with sentence_embedding)."""
    directory, _, _ = checkpoint
    out = {}
    for target in ("functions", "portable", "ort"):
        path = tmp_path_factory.mktemp(f"bert_{target}")
        export(directory, path, target=target, sentence_embedding=True)
        out[target] = path
    return out


def _real(x: np.ndarray) -> np.ndarray:
    """The rows' real tokens, flattened [N, C] (pads have no defined value to compare)."""
    return x[_batch()["attention_mask"].astype(bool)]


def _run(path, feeds):
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def test_numpy_forward_matches_hf(checkpoint, hf_hidden):
    _, model, weights = checkpoint
    batch = _batch()
    ours = forward.bert(weights, model.config.to_dict(), **batch)
    assert_close(_real(hf_hidden), _real(ours), 1e-5, "HF eager vs NumPy float64")


@pytest.mark.parametrize("target", ["functions", "portable", "ort"])
def test_export_matches_hf(exports, checkpoint, hf_hidden, target):
    _, model, weights = checkpoint
    batch = _batch()
    outputs = _run(exports[target], batch)
    assert outputs["last_hidden_state"].shape == hf_hidden.shape
    reference = forward.bert(weights, model.config.to_dict(), **batch)
    hidden = outputs["last_hidden_state"]
    assert_close(_real(hidden), _real(hf_hidden).astype(np.float64), ATOL, f"{target} vs HF")
    assert_close(_real(hidden), _real(reference), ATOL, f"{target} vs NumPy")
    pooled = forward.mean_pool_normalize(hf_hidden.astype(np.float64), batch["attention_mask"])
    assert_close(outputs["sentence_embedding"], pooled, 1e-5, f"{target} sentence_embedding")


def test_io_names_and_kernels(exports):
    model = onnx.load(str(exports["portable"] / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "sentence_embedding"]
    dims = [d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["batch_size", "sequence_length"]
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("Attention") == CONFIG["num_hidden_layers"]
    assert all(n.domain == "" for n in model.graph.node)
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    assert {a.name: a.i for a in attention.attribute}.get("is_causal", 0) == 0
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        assert (exports["portable"] / name).is_file()
    assert not (exports["portable"] / "genai_config.json").exists()


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_functions_graph_has_one_block_per_layer(exports):
    """No split_heads/SDPA/merge_heads at the top level: one block call per layer, whose
    attributes say what it computes."""
    model = onnx.load(str(exports["functions"] / "model.onnx"), load_external_data=False)
    top = [n for n in model.graph.node if n.domain == "graphattn"]
    blocks = [n for n in top if n.op_type.startswith("EncoderSelfAttention")]
    layers = CONFIG["num_hidden_layers"]
    assert [n.name for n in blocks] == [f"layers.{i}/attn" for i in range(layers)]
    assert {n.op_type for n in blocks} == {"EncoderSelfAttention_qkv_bias_o_bias"}
    loose = {"SplitHeads", "MergeHeads", "ScaledDotProductAttention", "RotaryHalves"}
    assert not loose & {n.op_type for n in top}
    roles = ["x", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias"]
    roles += ["o_weight", "o_bias", "bias"]
    head_dim = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    for node in blocks:
        attrs = _attributes(node)
        assert attrs["input_roles"] == [r.encode() for r in roles]
        assert len(node.input) == len(roles) and len(node.output) == 1
        assert (attrs["num_heads"], attrs["kv_heads"], attrs["head_dim"]) == (4, 4, head_dim)
        assert attrs["causal"] == 0 and attrs["window"] == 0
        assert attrs["rope"] == b"none" and attrs["rotary_dim"] == 0
        assert abs(attrs["scale"] - head_dim**-0.5) < 1e-7
    assert sum(n.op_type == "AttentionBias" for n in top) == 1  # shared by the layers


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_lowering_recorded_per_layer(exports, target):
    model = onnx.load(str(exports[target] / "model.onnx"), load_external_data=False)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    layers = CONFIG["num_hidden_layers"]
    assert [n.name for n in attention] == [f"layers.{i}/attn/attention" for i in range(layers)]
    for node in attention:
        assert len(node.input) == 4 and len(node.output) == 1  # no past, no present
        attrs = _attributes(node)
        assert attrs.get("is_causal", 0) == 0 and attrs["q_num_heads"] == attrs["kv_num_heads"]
    metadata = {p.key: p.value for p in model.metadata_props}
    decisions = json.loads(metadata[LOWERING_KEY])
    assert [d["layer"] for d in decisions] == [f"layers.{i}" for i in range(layers)]
    for decision in decisions:
        assert decision["kernel"] == "Attention" and decision["detail"] == "bidirectional"
        if target == "ort":
            assert "always causal" in decision["reasons"]["GroupQueryAttention"]
        else:
            assert decision["reasons"] == {}
    text = describe(exports[target], explain=True)
    assert f"layers.0 … layers.1 ({layers} layers): Attention (bidirectional)" in text
    assert ("not GroupQueryAttention: the kernel is always causal" in text) == (target == "ort")


def test_interpreter_runs_functions_graph(exports, hf_hidden):
    batch = _batch()
    model = onnx.load(str(exports["functions"] / "model.onnx"))
    outputs = Interpreter(model).run(batch)
    assert_close(_real(outputs["last_hidden_state"]), _real(hf_hidden), ATOL, "interpreter")
    pooled = forward.mean_pool_normalize(hf_hidden.astype(np.float64), batch["attention_mask"])
    assert_close(outputs["sentence_embedding"], pooled, 1e-5, "interpreter pooled")


@pytest.mark.parametrize(
    ("target", "precision", "atol"),
    [("portable", "fp16", 1e-2), ("ort", "fp16", 1e-2), ("ort", "int8", 5e-2)],
)
def test_lower_precisions_run(checkpoint, hf_hidden, tmp_path, target, precision, atol):
    directory, _, _ = checkpoint
    export(directory, tmp_path, target=target, precision=precision, sentence_embedding=True)
    outputs = _run(tmp_path, _batch())
    expected = np.float16 if precision == "fp16" else np.float32
    assert outputs["last_hidden_state"].dtype == expected
    hidden = outputs["last_hidden_state"].astype(np.float32)
    assert_close(_real(hidden), _real(hf_hidden), atol, f"{target} {precision}")
    norms = np.linalg.norm(outputs["sentence_embedding"].astype(np.float64), axis=-1)
    assert_close(norms, np.ones(3), 2e-3, f"{target} {precision} embedding norms")


def test_embed_cli(exports, checkpoint, capsys):
    _, model, weights = checkpoint
    texts = ["Hello world, the graph attends!", "every token of its row", "bert"]
    assert cli.main(["embed", str(exports["ort"]), *texts, "--json", "--provider", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == texts
    got = np.array([r["embedding"] for r in rows])
    tokenizer = tiny_wordpiece.write_tokenizer(exports["ort"] / "tok_check")
    encodings = [tokenizer.encode(t) for t in texts]
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((3, length), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)], mask[row, : len(e.ids)] = e.ids, 1
    assert ids[0, 0] == tiny_wordpiece.VOCAB["[CLS]"] and ids[0, 1] != tiny_wordpiece.VOCAB["[UNK]"]
    hidden = forward.bert(weights, model.config.to_dict(), ids, mask, np.zeros_like(ids))
    assert_close(got, forward.mean_pool_normalize(hidden, mask), 1e-5, "embed --json")

    assert cli.main(["embed", str(exports["functions"]), texts[0], "--values", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "dim 32 norm 1.0000" in line and ", ...]" in line


def test_embed_errors_are_one_line(tmp_path, exports, capsys):
    assert cli.main(["embed", str(tmp_path / "missing"), "text"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("graphattn: error:") and "model.onnx" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((exports["portable"] / "model.onnx").read_bytes())
    (bare / "model.onnx.data").write_bytes((exports["portable"] / "model.onnx.data").read_bytes())
    assert cli.main(["embed", str(bare), "text"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer.json or vocab.txt" in err


def test_export_refusals(checkpoint, tmp_path, capsys):
    directory, _, _ = checkpoint
    relative = tmp_path / "relative"
    relative.mkdir()
    config = json.loads((directory / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (relative / "config.json").write_text(json.dumps(config))
    (relative / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    assert cli.main(["export", str(relative), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "position_embedding_type='relative_key'" in err

    small = tmp_path / "small"
    small.mkdir()
    config = dict(json.loads((directory / "config.json").read_text()), intermediate_size=40)
    (small / "config.json").write_text(json.dumps(config))
    (small / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="intermediate.dense.weight.*shape"):
        export(small, tmp_path / "out2")
    with pytest.raises(ValueError, match="layout"):
        export(directory, tmp_path / "out3", layout="transformers.js")


def test_emitters_check_parameters():
    g = GraphEmitter("t")
    hidden = g.input("hidden", None, [2, 3])
    mask = g.input("mask", None, [2, 3])
    with pytest.raises(ValueError, match="hidden must have rank 3"):
        sentence_embedding(g, hidden, mask)
    hidden3 = g.input("hidden3", None, [2, 3, 4])
    with pytest.raises(ValueError, match="epsilon"):
        sentence_embedding(g, hidden3, mask, epsilon=0.0)
    with pytest.raises(ValueError, match="window"):
        bidirectional_bias(g, mask, window=0)
    with pytest.raises(ValueError, match="attention_mask must have rank 2"):
        bidirectional_bias(g, hidden3)
    weights = {f"{p}_weight": g.input(f"w{p}", None, [4, 4]) for p in "qkvo"}
    bias = g.input("bias", None, [2, 1, 3, 3])
    with pytest.raises(ValueError, match="missing weights"):
        encoder_attention_block(g, hidden3, {}, bias_B1SS=bias, num_heads=2, head_dim=2, name="a")
    with pytest.raises(ValueError, match="unknown weight roles"):
        encoder_attention_block(
            g, hidden3, {**weights, "sinks": bias}, bias_B1SS=bias, num_heads=2, head_dim=2,
            name="a",
        )  # fmt: skip
    with pytest.raises(ValueError, match="window"):
        encoder_attention_block(
            g, hidden3, weights, bias_B1SS=bias, num_heads=2, head_dim=2, window=0, name="a"
        )
    with pytest.raises(ValueError, match="cos_sin"):
        encoder_attention_block(
            g, hidden3, weights, bias_B1SS=bias, num_heads=2, head_dim=2, rope="halves", name="a"
        )
    with pytest.raises(ValueError, match="bias must have rank 4"):
        encoder_attention_block(g, hidden3, weights, bias_B1SS=mask, num_heads=2, head_dim=2,
                                name="a")  # fmt: skip


def test_cli_export_and_task_model(checkpoint, tmp_path, capsys):
    """``graphattn export`` prints its summary line; a BertForMaskedLM checkpoint (weights under
    ``bert.``, an MLM head beside them) exports its encoder, equal to the model's ``.bert``."""
    directory, _, _ = checkpoint
    out = tmp_path / "cli"
    assert (
        cli.main(["export", str(directory), "-o", str(out), "--target", "portable", "--quiet"]) == 0
    )
    assert capsys.readouterr().out.startswith("exported bert: 2 layers,")
    # no sentence_embedding output: embed pools last_hidden_state in NumPy, same vectors
    text = "the graphs attend"
    assert cli.main(["embed", str(out), text, "--json"]) == 0
    pooled_here = np.array(json.loads(capsys.readouterr().out)[0]["embedding"])
    with_output = tmp_path / "with_output"
    export(directory, with_output, target="portable", sentence_embedding=True)
    assert cli.main(["embed", str(with_output), text, "--json"]) == 0
    pooled_graph = np.array(json.loads(capsys.readouterr().out)[0]["embedding"])
    assert_close(pooled_here, pooled_graph, 1e-6, "NumPy pooling vs sentence_embedding")
    torch.manual_seed(1)
    config = transformers.BertConfig(**CONFIG, architectures=["BertForMaskedLM"])
    config._attn_implementation = "eager"
    model = transformers.BertForMaskedLM(config).eval()
    masked = tmp_path / "masked_lm"
    model.save_pretrained(masked)
    export(masked, tmp_path / "masked_out", target="ort")
    batch = _batch()
    with torch.no_grad():
        expected = model.bert(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
    ours = _run(tmp_path / "masked_out", batch)["last_hidden_state"]
    assert_close(_real(ours), _real(expected.numpy()), ATOL, "BertForMaskedLM encoder")
