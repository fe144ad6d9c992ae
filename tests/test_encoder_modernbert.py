"""ModernBERT encoder export: a tiny random ModernBertModel (3 layers: one global, two local
with ``local_attention = 4``, i.e. keys within 2 positions; RoPE bases 1000 / 100 so the two
kinds rotate differently; random norm scales) on a right-padded batch of 3 rows of 9 tokens,
against HF eager and an independent float64 NumPy forward, on every target and in the
NumPy interpreter; the config mapping reads the hub's older keys too. Each layer is one
``graphattn.EncoderSelfAttention_rope_halves`` call (its window and RoPE as attributes), one
``Attention`` with two ``RotaryEmbedding`` after lowering, and one recorded decision.
"""

import json

import numpy as np
import numpy_forward_bert as forward
import onnx
import onnxruntime as ort
import pytest
from harness import assert_close

from graphattn.exporters.export import export
from graphattn.inspect import describe
from graphattn.interpreter import Interpreter
from graphattn.models import modernbert
from graphattn.spec import LOWERING_KEY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 40,
    "max_position_embeddings": 16,
    "local_attention": 4,
    "global_rope_theta": 1000.0,
    "local_rope_theta": 100.0,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "cls_token_id": 2,
    "sep_token_id": 3,
}
LENGTHS = (9, 6, 3)
ATOL = 1e-4


def _batch():
    rng = np.random.default_rng(3)
    length = max(LENGTHS)
    ids = rng.integers(5, CONFIG["vocab_size"], (3, length)).astype(np.int64)
    mask = np.array([[1] * n + [0] * (length - n) for n in LENGTHS], np.int64)
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _real(x: np.ndarray) -> np.ndarray:
    return x[_batch()["attention_mask"].astype(bool)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(**CONFIG, architectures=["ModernBertModel"])
    config._attn_implementation = "eager"
    model = transformers.ModernBertModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            if "Wqkv" in name:  # sharper attention: which keys are in the window shows
                parameter.copy_(8.0 * parameter)
    directory = tmp_path_factory.mktemp("modernbert")
    model.save_pretrained(directory)
    feeds = {k: torch.tensor(v) for k, v in _batch().items()}
    with torch.no_grad():
        hidden = model(**feeds).last_hidden_state.numpy()
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    return directory, hidden, weights


@pytest.fixture(scope="module")
def reference(checkpoint):
    _, _, weights = checkpoint
    return forward.modernbert(weights, {**CONFIG, "global_attn_every_n_layers": 3}, **_batch())


def test_numpy_forward_matches_hf(checkpoint, reference):
    _, hidden, _ = checkpoint
    assert_close(_real(hidden), _real(reference), 1e-5, "HF eager vs NumPy float64")


@pytest.mark.parametrize("target", ["functions", "portable", "ort"])
def test_export_matches_hf(checkpoint, reference, tmp_path, target):
    directory, hidden, _ = checkpoint
    export(directory, tmp_path, target=target, sentence_embedding=True)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    batch = _batch()
    ours, pooled = session.run(["last_hidden_state", "sentence_embedding"], batch)
    assert_close(_real(ours), _real(hidden).astype(np.float64), ATOL, f"{target} vs HF")
    assert_close(_real(ours), _real(reference), ATOL, f"{target} vs NumPy")
    expected = forward.mean_pool_normalize(hidden.astype(np.float64), batch["attention_mask"])
    assert_close(pooled, expected, 1e-5, f"{target} sentence_embedding")
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    if target == "functions":
        outputs = Interpreter(onnx.load(str(tmp_path / "model.onnx"))).run(batch)
        assert_close(_real(outputs["last_hidden_state"]), _real(reference), ATOL, "interpreter")
        _check_blocks(model.graph)
    else:
        kinds = [n.op_type for n in model.graph.node]
        assert kinds.count("Attention") == 3 and kinds.count("RotaryEmbedding") == 6
        _check_lowering(model, tmp_path, target)


WINDOWS = [0, 3, 3]  # local_attention 4: keys with |s - t| < 3


def _check_blocks(graph) -> None:
    """One block call per layer, no loose attention pieces; window and RoPE are attributes."""
    top = [n for n in graph.node if n.domain == "graphattn"]
    blocks = [n for n in top if n.op_type.startswith("EncoderSelfAttention")]
    assert [n.name for n in blocks] == [f"layers.{i}/attn" for i in range(3)]
    assert {n.op_type for n in blocks} == {"EncoderSelfAttention_rope_halves"}
    assert not {"SplitHeads", "RotaryHalves", "ScaledDotProductAttention"} & {
        n.op_type for n in top
    }
    roles = [b"x", b"q_weight", b"k_weight", b"v_weight", b"o_weight", b"cos", b"sin", b"bias"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in blocks]
    assert [a["window"] for a in attrs] == WINDOWS
    for a in attrs:
        assert a["causal"] == 0 and a["rope"] == b"halves" and a["rotary_dim"] == 8
        assert a["input_roles"] == roles and a["num_heads"] == a["kv_heads"] == 4
    biases = [n for n in top if n.op_type == "AttentionBias"]  # one per distinct window
    assert len(biases) == 2


def _check_lowering(model, path, target) -> None:
    decisions = json.loads({p.key: p.value for p in model.metadata_props}[LOWERING_KEY])
    assert [d["layer"] for d in decisions] == [f"layers.{i}" for i in range(3)]
    details = ["bidirectional, rope halves 8"] + 2 * [
        "bidirectional, keys |s-t| < 3, rope halves 8"
    ]
    assert [d["detail"] for d in decisions] == details
    assert all(d["kernel"] == "Attention" for d in decisions)
    assert all(("GroupQueryAttention" in d["reasons"]) == (target == "ort") for d in decisions)
    text = describe(path, explain=True)
    assert "layers.0: Attention (bidirectional, rope halves 8)" in text
    assert "layers.1 … layers.2 (2 layers): Attention (bidirectional, keys |s-t| < 3" in text


def test_fp16_runs(checkpoint, tmp_path):
    directory, hidden, _ = checkpoint
    export(directory, tmp_path, target="ort", precision="fp16")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (ours,) = session.run(["last_hidden_state"], _batch())
    assert ours.dtype == np.float16
    assert_close(_real(ours), _real(hidden), 2e-2, "fp16 vs HF")


def test_window_matters(checkpoint, reference):
    """The local layers' window changes the result (the test above would notice it off by one)."""
    _, _, weights = checkpoint
    wider = forward.modernbert(
        weights, {**CONFIG, "local_attention": 6, "global_attn_every_n_layers": 3}, **_batch()
    )
    difference = np.abs(_real(wider) - _real(reference)).max()
    assert difference > 100 * ATOL, difference


def test_config_mapping_old_and_new_keys(checkpoint):
    directory, _, _ = checkpoint
    new = modernbert.config_from_hf(json.loads((directory / "config.json").read_text()))
    old = modernbert.config_from_hf({**CONFIG, "global_attn_every_n_layers": 3})
    assert new.layers == old.layers
    assert [layer.window for layer in new.layers] == [None, 3, 3]
    assert [layer.rope.theta for layer in new.layers] == [1000.0, 100.0, 100.0]
    with pytest.raises(ValueError, match="rope_type='linear'"):
        modernbert.config_from_hf(
            {**CONFIG, "rope_parameters": {"full_attention": {"rope_type": "linear"}}}
        )
    with pytest.raises(ValueError, match="hidden_activation='tanh'"):
        modernbert.config_from_hf({**CONFIG, "hidden_activation": "tanh"})
