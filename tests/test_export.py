"""Export tiny random GPT-2 / Llama-family checkpoints and check the ONNX model end to end.

Witnesses: an independent NumPy forward pass (logits and presents, max abs <= 1e-4), the
NumPy interpreter (equals onnxruntime), and the cache contract (prefill N then K decode steps
equals one pass over N+K; a left-padded batch equals each row alone).
"""

import json

import checkpoints
import numpy as np
import numpy_forward
import onnx
import pytest
from decoder_runner import Decoder, positions_for
from harness import assert_close

from graphattn import export

ATOL = 1e-4


def padded_batch(vocab: int, lengths=(7, 5, 3), seed=0):
    """Left-padded ids/mask [3, max(lengths)] and the unpadded rows."""
    rng = np.random.default_rng(seed)
    total = max(lengths)
    rows = [rng.integers(3, vocab, size=n) for n in lengths]
    ids = np.zeros((len(rows), total), dtype=np.int64)
    mask = np.zeros((len(rows), total), dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, total - len(row) :], mask[r, total - len(row) :] = row, 1
    return ids, mask, rows


@pytest.fixture(scope="module", params=list(checkpoints.ALL_VARIANTS))
def exported(request, tmp_path_factory):
    config = checkpoints.ALL_VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    weights = checkpoints.write_checkpoint(root / "hf", config, seed=len(request.param))
    export(root / "hf", root / "onnx", target="functions", last_logits_only=False)
    return request.param, config, weights, root / "onnx"


def test_logits_and_presents_match_numpy_forward(exported):
    name, config, weights, out_dir = exported
    ids, mask, _ = padded_batch(config["vocab_size"])
    logits, presents = Decoder(out_dir)(ids, mask)
    expected_logits, expected_presents = numpy_forward.forward(
        weights, config, ids, mask, positions_for(mask, ids.shape[1])
    )
    real = mask[:, :, None].astype(bool)  # pad query rows are undefined
    assert_close(
        np.where(real, logits, 0), np.where(real, expected_logits, 0), ATOL, f"{name} logits"
    )
    for i, ((key, value), (ref_key, ref_value)) in enumerate(zip(presents, expected_presents)):
        real_kv = mask[:, None, :, None].astype(bool)
        assert_close(
            np.where(real_kv, key, 0),
            np.where(real_kv, ref_key, 0),
            ATOL,
            f"{name} present.{i}.key",
        )
        assert_close(
            np.where(real_kv, value, 0),
            np.where(real_kv, ref_value, 0),
            ATOL,
            f"{name} present.{i}.value",
        )


def test_interpreter_equals_onnxruntime(exported):
    name, config, _, out_dir = exported
    ids, mask, _ = padded_batch(config["vocab_size"], lengths=(4, 2, 3))
    logits, presents = Decoder(out_dir)(ids, mask)
    logits_np, presents_np = Decoder(out_dir, engine="interpreter")(ids, mask)
    assert_close(logits_np, logits.astype(np.float64), 1e-5, f"{name} logits")
    for (key, value), (key_np, value_np) in zip(presents, presents_np):
        assert_close(key_np, key.astype(np.float64), 1e-5, f"{name} present key")
        assert_close(value_np, value.astype(np.float64), 1e-5, f"{name} present value")


def test_prefill_then_decode_equals_one_pass(exported):
    name, config, _, out_dir = exported
    decoder = Decoder(out_dir)
    rng = np.random.default_rng(1)
    prompt_len, steps = 5, 4
    ids = rng.integers(3, config["vocab_size"], size=(2, prompt_len + steps))
    mask = np.ones_like(ids)
    full_logits, full_presents = decoder(ids, mask)
    logits, past = decoder(ids[:, :prompt_len], mask[:, :prompt_len])
    step_logits = [logits]
    for t in range(prompt_len, prompt_len + steps):
        logits, past = decoder(ids[:, t : t + 1], mask[:, : t + 1], past)
        step_logits.append(logits)
    assert_close(np.concatenate(step_logits, axis=1), full_logits.astype(np.float64), ATOL, name)
    for (key, value), (full_key, full_value) in zip(past, full_presents):
        assert_close(key, full_key.astype(np.float64), ATOL, f"{name} cache key")
        assert_close(value, full_value.astype(np.float64), ATOL, f"{name} cache value")


def test_left_padded_batch_equals_each_row_alone(exported):
    name, config, _, out_dir = exported
    decoder = Decoder(out_dir)
    ids, mask, rows = padded_batch(config["vocab_size"], seed=3)
    logits, past = decoder(ids, mask)
    next_ids = np.argmax(logits[:, -1], axis=-1)[:, None]
    mask2 = np.concatenate([mask, np.ones((3, 1), dtype=np.int64)], axis=1)
    step_logits, _ = decoder(next_ids, mask2, past)
    for r, row in enumerate(rows):
        alone_logits, alone_past = decoder(row[None], np.ones((1, len(row)), dtype=np.int64))
        assert_close(
            logits[r, -len(row) :], alone_logits[0].astype(np.float64), ATOL, f"{name} row {r}"
        )
        alone_step, _ = decoder(
            next_ids[r : r + 1], np.ones((1, len(row) + 1), dtype=np.int64), alone_past
        )
        assert_close(
            step_logits[r], alone_step[0].astype(np.float64), ATOL, f"{name} row {r} decode"
        )


def test_graph_is_valid_and_uses_the_standard_io(exported):
    name, config, _, out_dir = exported
    onnx.checker.check_model(str(out_dir / "model.onnx"), full_check=True)
    model = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    layers = len([n for n in inputs if n.endswith(".key")])
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in model.graph.output][:3] == [
        "logits",
        "present.0.key",
        "present.0.value",
    ]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims == [
        "batch_size",
        config["num_key_value_heads"] if "num_key_value_heads" in config else dims[1],
        "past_sequence_length",
        dims[3],
    ]
    genai = json.loads((out_dir / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == layers
    assert genai["model"]["vocab_size"] == config["vocab_size"]
    large = [t for t in model.graph.initializer if np.prod(t.dims) * 4 > 1024]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
