"""The engine over a paged KV export (``kv_layout="paged"``): with seeded random arrivals and
lengths, prefill chunks mixed with decodes in one call, every sequence's greedy tokens equal
running it alone through the *contiguous* export of the same checkpoint (PlainCache, no
engine code), logits <= 1e-4; preemption under a small pool; cancel frees blocks at once;
prefix sharing reuses a common prompt's blocks and skips their prefill; the block allocator
on its own. Every engine a test makes ends with its pool empty (the ``engines`` fixture
asserts that blocks_used is 0 and every allocation was freed)."""

import checkpoints
import numpy as np
import pytest
import tiny_tokenizer
from test_engine import alone

from graphattn import export
from graphattn.runtime import ModelSession
from graphattn.runtime.block_pool import BlockPool, PoolExhausted
from graphattn.runtime.engine import Engine, RequestParams

BS = 4  # small blocks: rows cross block boundaries often
MODELS = {
    "gpt2": {**checkpoints.GPT2, "vocab_size": 300, "eos_token_id": 2},
    "llama": {**checkpoints.LLAMA, "vocab_size": 300, "eos_token_id": 2},
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_paged")
    made = {}
    for name, config in MODELS.items():
        checkpoints.write_checkpoint(root / name / "hf", config, seed=11)
        tiny_tokenizer.write_tokenizer(root / name / "hf")
        out = root / name / "contiguous"
        export(root / name / "hf", out, target="portable")
        made[name, "reference"] = ModelSession(out)
        for target in ("portable", "ort"):
            out = root / name / f"paged-{target}"
            export(root / name / "hf", out, target=target, kv_layout="paged", kv_block_size=BS)
            made[name, target] = out
    return made


@pytest.fixture
def engines():
    """Engine(...) maker; after the test, every engine's pool is back to empty."""
    made = []

    def make(*args, **kwargs):
        engine = Engine(*args, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        stats = engine.stats()
        assert (stats["running"], stats["queue_depth"], stats["cache_rows"]) == (0, 0, 0)
        assert stats["blocks_used"] == stats["cache_slots"] == 0
        assert stats["block_allocations"] == stats["block_frees"]
        assert stats["blocks_free"] == stats["blocks_total"]


def decided_prompts(reference, rng, count, lengths, steps):
    """``count`` (prompt, max_tokens) whose greedy run alone has top-2 margins > 1e-3."""
    found = []
    while len(found) < count:
        prompt = [int(t) for t in rng.integers(3, 300, int(rng.integers(*lengths)))]
        max_tokens = int(rng.integers(*steps))
        if len(prompt) + max_tokens > 64:
            continue
        if alone(reference, prompt, max_tokens, check=False) is not None:
            found.append((prompt, max_tokens))
    return found


def run_arrivals(engine, cases, rng):
    requests = []
    for prompt, max_tokens in cases:
        params = RequestParams(max_tokens=max_tokens, temperature=0.0, use_eos=False)
        requests.append(engine.submit(prompt, params))
        for _ in range(int(rng.integers(0, 3))):
            engine.step()
    engine.run_until_idle(10_000)
    return requests


def check_alone(reference, requests):
    for request in requests:
        assert request.finish_reason == "length"
        tokens, logits = alone(reference, request.prompt_ids, request.params.max_tokens)
        assert request.token_ids == tokens, request.prompt_ids
        np.testing.assert_allclose(np.array(request.logits), np.array(logits), atol=1e-4)


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kv_budget", [None, 64])
def test_random_arrivals_equal_each_alone(exports, engines, name, target, kv_budget):
    engine = engines(
        exports[name, target], max_running=4, token_budget=10, kv_budget=kv_budget,
        record_logits=True, prefix_sharing=False,
    )  # fmt: skip
    assert engine.kv_store == "paged"
    reference = exports[name, "reference"]
    rng = np.random.default_rng(3)
    steps = (15, 30) if kv_budget else (1, 14)  # a one-context pool: rows get preempted
    cases = decided_prompts(reference, rng, 10, (1, 20), steps)
    requests = run_arrivals(engine, cases, rng)
    check_alone(reference, requests)
    stats = engine.stats()
    assert stats["block_allocations"] > len(requests)  # rows crossed block boundaries
    # calls that mixed prefill chunks with decodes, and steps split into two calls
    assert stats["mixed_calls"] > 0 and stats["graph_calls"] > stats["steps"]
    if kv_budget:
        assert stats["blocks_total"] == 64 // BS
        assert stats["preemptions"] > 0  # recompute path taken, still exact


def test_prefix_sharing_reuses_the_common_prompt(exports, engines):
    reference = exports["llama", "reference"]
    rng = np.random.default_rng(7)
    system = [int(t) for t in rng.integers(3, 300, 13)]  # 3 full blocks and one token
    suffixes = [[int(t) for t in rng.integers(3, 300, int(rng.integers(1, 6)))] for _ in range(5)]
    cases = [(system + s, 8) for s in suffixes]
    for prompt, steps in cases:
        assert alone(reference, prompt, steps, check=False) is not None, "a near tie"
    computed = {}
    for sharing in (True, False):
        engine = engines(
            exports["llama", "portable"], max_running=4, token_budget=16,
            record_logits=True, prefix_sharing=sharing,
        )  # fmt: skip
        first = engine.submit(cases[0][0], RequestParams(max_tokens=8, temperature=0.0))
        engine.step()  # the first prompt is computed; its full blocks are keyed
        rest = [
            engine.submit(p, RequestParams(max_tokens=s, temperature=0.0, use_eos=False))
            for p, s in cases[1:]
        ]
        engine.run_until_idle()
        requests = [first, *rest]
        for request in rest:
            tokens, logits = alone(reference, request.prompt_ids, request.params.max_tokens)
            assert request.token_ids == tokens
            np.testing.assert_allclose(np.array(request.logits), np.array(logits), atol=1e-4)
        stats = engine.stats()
        computed[sharing] = stats["prompt_tokens"]
        if sharing:
            assert stats["prefix_cached_tokens"] == 4 * 12  # 3 blocks for each later request
            assert stats["prefix_hit_blocks"] == 4 * 3
        else:
            assert stats["prefix_cached_tokens"] == stats["prefix_hit_blocks"] == 0
        assert all(r.finished for r in requests)
    total = sum(len(p) for p, _ in cases)
    assert computed[False] - computed[True] == 4 * 12
    assert computed[False] >= total


def test_cancel_frees_blocks_at_once(exports, engines):
    engine = engines(exports["gpt2", "ort"], max_running=3, token_budget=8)
    params = RequestParams(max_tokens=20, temperature=0.0, use_eos=False)
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41], [100, 7, 3], [9, 9, 9]]
    requests = [engine.submit(p, params) for p in prompts]
    for _ in range(4):
        engine.step()
    before = engine.stats()["blocks_used"]
    held = len(requests[1]._engine._rows[1].paged.blocks)
    requests[1].cancel()
    requests[3].cancel()  # still queued: held nothing
    after = engine.stats()
    assert after["cache_rows"] == 2 and after["blocks_used"] == before - held > 0
    assert (requests[1].finish_reason, requests[3].finish_reason) == ("cancelled",) * 2
    engine.run_until_idle()
    reference = exports["gpt2", "reference"]
    for index in (0, 2):
        assert requests[index].token_ids == alone(reference, prompts[index], 20)[0]


def test_block_pool_counts_references_and_keys():
    pool = BlockPool(3, 2)
    a, b = pool.allocate(), pool.allocate()
    assert (pool.blocks_used, pool.blocks_free, pool.allocations) == (2, 1, 2)
    pool.register(a, (None, (1, 2)))
    assert pool.lookup((None, (1, 2))) == a and pool.refs[a] == 2
    assert pool.lookup((None, (9, 9))) is None
    pool.release(a)
    assert pool.blocks_used == 2  # one reference left
    pool.release(a)
    pool.release(b)
    assert (pool.blocks_used, pool.frees, pool.stats()["cached_blocks"]) == (0, 2, 1)
    assert pool.lookup((None, (1, 2))) == a  # a freed keyed block is still found
    assert pool.blocks_used == 1 and pool.allocations == 3
    c, d = pool.allocate(), pool.allocate()  # the freed unkeyed block, then a fresh one
    assert (c, d) == (b, 2)
    with pytest.raises(PoolExhausted):
        pool.allocate()
    for block in (a, c, d):
        pool.release(block)
    with pytest.raises(ValueError, match="not in use"):
        pool.release(a)
    x, y, z = (pool.allocate() for _ in range(3))  # unkeyed (warmest first), then keyed
    assert (x, y, z) == (d, c, a) and pool.lookup((None, (1, 2))) is None
    for block in (x, y, z):
        pool.release(block)
    assert pool.blocks_used == 0 and pool.allocations == pool.frees == 8
