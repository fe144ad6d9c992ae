"""The continuous-batching engine: with seeded random arrivals and lengths every sequence's
tokens equal generating it alone (greedy with decided margins and logits <= 1e-4, seeded
samples), chunked prefill mixed with decodes, compaction, preemption by recompute, cancel,
stop strings and ids, the background thread, and refusals. Every test ends with the cache
freed (no rows, no slots)."""

import checkpoints
import numpy as np
import pytest
import tiny_tokenizer

from graphattn import export
from graphattn.runtime import Generator, ModelSession, PlainCache
from graphattn.runtime.engine import Engine, PromptTooLong, QueueFull, RequestParams
from graphattn.runtime.generate import positions

MODELS = {
    "gpt2": {**checkpoints.GPT2, "vocab_size": 300, "eos_token_id": 2},
    "llama": {**checkpoints.LLAMA, "vocab_size": 300, "eos_token_id": 2},
    # head_dim 16: the ort target lowers it to GroupQueryAttention (slot positions)
    "llama-gqa": checkpoints.llama_variant(vocab_size=300, hidden_size=64, intermediate_size=64),
}
CASES = [
    ("gpt2", "portable"),
    ("gpt2", "ort"),
    ("llama", "portable"),
    ("llama", "ort"),
    ("llama-gqa", "ort"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    made = {}
    for name, config in MODELS.items():
        checkpoints.write_checkpoint(root / name / "hf", config, seed=11)
        tiny_tokenizer.write_tokenizer(root / name / "hf")
        for target in ("portable", "ort"):
            if (name, target) in CASES:
                out = root / name / target
                export(root / name / "hf", out, target=target)
                made[name, target] = out
    return made


def alone(session: ModelSession, prompt: list[int], steps: int, check: bool = True):
    """Greedy tokens and last-position logits of ``prompt`` run by itself; ``check``: assert
    every step's top-2 margin is > 1e-3 (so float rounding cannot flip a token)."""
    cache = PlainCache(session, 64)
    cache.reset(1)
    ids = np.array([prompt], dtype=np.int64)
    mask = np.ones_like(ids)
    logits = cache.step(ids, mask, positions(mask, ids.shape[1]))[0, -1]
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits)
        top2 = np.sort(logits)[-2:]
        if not check and top2[1] - top2[0] <= 1e-3:
            return None
        assert top2[1] - top2[0] > 1e-3, "a near tie"
        tokens.append(int(np.argmax(logits)))
        mask = np.concatenate([mask, [[1]]], axis=1)
        step = cache.step(np.array([[tokens[-1]]]), mask, positions(mask, 1))
        logits = step[0, -1]
    return tokens, rows


def freed(engine: Engine) -> None:
    stats = engine.stats()
    assert (stats["running"], stats["queue_depth"]) == (0, 0)
    assert (stats["cache_rows"], stats["cache_slots"]) == (0, 0)


def arrivals(engine: Engine, seed: int, count: int, params, lengths=(1, 15)):
    """Submit ``count`` random prompts, a random number of steps apart; run to the end.
    Greedy prompts whose run alone meets a near tie are drawn again (seeded: always the same)."""
    rng = np.random.default_rng(seed)
    submitted = []
    for _ in range(count):
        while True:
            prompt = [int(t) for t in rng.integers(3, 300, int(rng.integers(*lengths)))]
            chosen = params(rng)
            if len(prompt) + chosen.max_tokens > engine.context_length:
                continue
            if chosen.temperature > 0:
                break
            if alone(engine.model, prompt, chosen.max_tokens, check=False) is not None:
                break
        request = engine.submit(prompt, chosen)
        submitted.append(request)
        for _ in range(int(rng.integers(0, 3))):
            engine.step()
    engine.run_until_idle(10_000)
    return submitted


def greedy(rng):
    return RequestParams(max_tokens=int(rng.integers(1, 14)), temperature=0.0, use_eos=False)


def long_greedy(rng):
    return RequestParams(max_tokens=int(rng.integers(15, 30)), temperature=0.0, use_eos=False)


@pytest.mark.parametrize(("name", "target"), CASES)
@pytest.mark.parametrize("kv_budget", [None, 64])
def test_random_arrivals_equal_each_alone(exports, name, target, kv_budget):
    engine = Engine(
        exports[name, target],
        max_running=4,
        token_budget=6,
        kv_budget=kv_budget,
        record_logits=True,
    )
    # GroupQueryAttention graphs run the in-place slot store (engine_slots)
    assert engine.kv_store == ("in_place_slots" if engine.slot_positions else "slots")
    generator = Generator(engine.model, cache="plain")
    # under the small budget (one context), longer answers: rows get preempted and recomputed
    requests = arrivals(engine, seed=3, count=10, params=long_greedy if kv_budget else greedy)
    for request in requests:
        steps = request.params.max_tokens
        assert request.finish_reason == "length"
        tokens, logits = alone(engine.model, request.prompt_ids, steps)
        assert request.token_ids == tokens, request.prompt_ids
        np.testing.assert_allclose(np.array(request.logits), np.array(logits), atol=1e-4)
        reference = generator.generate(request.prompt_ids, max_new_tokens=steps, use_eos=False)
        assert request.token_ids == reference.token_ids
    stats = engine.stats()
    if kv_budget:
        assert stats["preemptions"] > 0  # recompute path taken, still exact
    elif not engine.slot_positions:
        assert stats["compactions"] > 0
    assert len(stats["ttft_seconds"]) == len(requests)
    freed(engine)


@pytest.mark.parametrize(("name", "target"), [("llama", "portable"), ("llama-gqa", "ort")])
def test_seeded_samples_equal_the_same_seed_alone(exports, name, target):
    engine = Engine(exports[name, target], max_running=3, token_budget=5, kv_budget=64)
    generator = Generator(engine.model, cache="plain")

    def sampled(rng):
        seed = int(rng.integers(0, 1000))
        return RequestParams(
            max_tokens=int(rng.integers(2, 12)),
            temperature=1.3,
            top_p=0.95,
            top_k=40,
            repetition_penalty=1.2,
            seed=seed,
            use_eos=False,
        )

    requests = arrivals(engine, seed=5, count=8, params=sampled)
    for request in requests:
        p = request.params
        reference = generator.generate(
            request.prompt_ids,
            max_new_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            seed=p.seed,
            use_eos=False,
        )
        assert request.token_ids == reference.token_ids
    assert len({tuple(r.token_ids) for r in requests}) > 1
    freed(engine)


@pytest.mark.parametrize(("name", "target"), [("gpt2", "portable"), ("llama-gqa", "ort")])
def test_cancel_frees_the_row_at_once(exports, name, target):
    engine = Engine(exports[name, target], max_running=3, token_budget=8)
    params = RequestParams(max_tokens=12, temperature=0.0, use_eos=False)
    prompts = [[5, 6, 7, 8], [40, 41], [100, 7, 3], [9, 9, 9]]
    requests = [engine.submit(p, params) for p in prompts]
    for _ in range(3):
        engine.step()
    assert engine.stats()["cache_rows"] == 3
    requests[1].cancel()
    requests[3].cancel()  # still queued
    assert engine.stats()["cache_rows"] == 2
    assert (requests[1].finish_reason, requests[3].finish_reason) == ("cancelled",) * 2
    assert list(requests[3].tokens(timeout=1)) == []
    engine.run_until_idle()
    for index in (0, 2):
        tokens, _ = alone(engine.model, prompts[index], 12)
        assert requests[index].token_ids == tokens
    assert len(list(requests[1].tokens(timeout=1))) == requests[1].completion_tokens < 12
    freed(engine)


def test_stop_strings_ids_and_deltas(exports):
    engine = Engine(exports["llama", "portable"], max_running=4)
    generator = Generator(engine.model, cache="plain")
    prompt = engine.tokenizer.encode("Once upon a time")
    whole = generator.generate(prompt, max_new_tokens=24, use_eos=False)
    text = whole.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and stop in text
    free = RequestParams(max_tokens=24, temperature=0.0, use_eos=False)
    by_string = engine.submit(prompt, RequestParams(**{**free.__dict__, "stop": (stop,)}))
    by_id = engine.submit(
        prompt, RequestParams(**{**free.__dict__, "stop_token_ids": (whole.token_ids[5],)})
    )
    plain = engine.submit(prompt, free)
    engine.run_until_idle()
    assert plain.text == text and "".join(plain.deltas(timeout=1)) == text
    assert by_string.finish_reason == "stop"
    assert by_string.text == text[: text.index(stop)]
    assert "".join(by_string.deltas(timeout=1)) == by_string.text
    stop_at = whole.token_ids.index(whole.token_ids[5])
    assert by_id.token_ids == whole.token_ids[: stop_at + 1] and by_id.finish_reason == "stop"
    assert by_id.text == engine.tokenizer.decode(whole.token_ids[:stop_at])
    freed(engine)


def test_background_thread_drains(exports):
    engine = Engine(exports["gpt2", "ort"], max_running=4, token_budget=8)
    engine.start()
    params = RequestParams(max_tokens=9, temperature=0.0, use_eos=False)
    prompts = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] for i in range(10)]
    requests = [engine.submit(p, params) for p in prompts]
    streamed = [list(r.tokens(timeout=30)) for r in requests[:3]]
    engine.stop(drain=True, timeout=60)
    for request, prompt in zip(requests, prompts):
        assert request.finish_reason == "length"
        assert request.token_ids == alone(engine.model, prompt, 9)[0]
    assert streamed == [r.token_ids for r in requests[:3]]
    freed(engine)


def test_refusals(exports):
    engine = Engine(exports["gpt2", "portable"], max_running=2, max_queue=2)
    assert engine.context_length == 64
    with pytest.raises(PromptTooLong, match="64"):
        engine.submit(list(range(3, 67)), RequestParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([5, 300], RequestParams())
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], RequestParams())
    first = engine.submit([5, 6], RequestParams(max_tokens=2))
    engine.submit([5, 6], RequestParams(max_tokens=2))
    with pytest.raises(QueueFull, match="max_queue"):
        engine.submit([5, 6], RequestParams())
    for field, value in [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("stop", ("",)),
        ("stop_token_ids", (-3,)),
    ]:
        with pytest.raises(ValueError, match=field):
            RequestParams(**{field: value})
    with pytest.raises(ValueError, match="token_budget"):
        Engine(exports["gpt2", "portable"], max_running=8, token_budget=4)
    with pytest.raises(ValueError, match="cache"):
        Engine(exports["gpt2", "portable"], cache="bound")
    first.cancel()
    engine.run_until_idle()
    freed(engine)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_long_rows_keep_the_time_axis_within_the_context(exports, name):
    engine = Engine(exports[name, "portable"], max_running=4, token_budget=64, record_logits=True)
    requests = arrivals(engine, seed=8, count=6, params=long_greedy, lengths=(20, 45))
    for request in requests:
        tokens, logits = alone(engine.model, request.prompt_ids, request.params.max_tokens)
        assert request.token_ids == tokens
        np.testing.assert_allclose(np.array(request.logits), np.array(logits), atol=1e-4)
    assert engine.stats()["compactions"] > 0
    freed(engine)


def test_context_end_finishes_with_length(exports):
    engine = Engine(exports["llama", "portable"], max_running=2)
    prompt = list(range(3, 60))
    request = engine.submit(prompt, RequestParams(max_tokens=50, temperature=0.0))
    engine.run_until_idle()
    assert request.finish_reason in ("length", "stop")
    assert len(prompt) + request.completion_tokens <= engine.context_length
    freed(engine)


def test_grouped_query_lengths_come_from_the_mask_shape(exports):
    """Why the in-place slot store right-aligns rows on one time axis: the GroupQueryAttention
    graph's ``seqlens_k`` is the mask's width − 1 for every row (not each row's mask sum), so
    a shorter row must end where the longer one ends (masked slots before it, one constant
    slot offset that RoPE does not see); placed at slot 0 with holes after it, its next
    token would be written and rotated at the wrong slot."""
    session = ModelSession(exports["llama-gqa", "ort"])
    assert session.shares_kv_buffer
    short, longer = [7, 8, 9], [20, 21, 22, 23, 24, 25]
    run = session.session.run
    names = session.output_names
    layout = session.cache_layout

    def prefill(tokens, offset=0):
        """Run ``tokens`` after ``offset`` masked zero slots; the K/V of the tokens."""
        ids = np.array([tokens], dtype=np.int64)
        mask = np.concatenate([np.zeros((1, offset), np.int64), np.ones_like(ids)], axis=1)
        feeds = {"input_ids": ids, "attention_mask": mask}
        for tensors in layout:
            for t in tensors:
                feeds[t.past] = np.zeros(t.shape(1, offset), dtype=t.dtype)
        out = dict(zip(names, run(None, feeds)))
        kv = [[out[t.present][:, :, offset:] for t in tensors] for tensors in layout]
        return kv, out["logits"][0, -1]

    short_kv, short_logits = prefill(short)
    shifted_kv, shifted_logits = prefill(short, offset=3)  # rotated at slots 3..5
    np.testing.assert_allclose(shifted_logits, short_logits, atol=1e-4)
    long_kv, long_logits = prefill(longer)
    nxt = [int(np.argmax(long_logits)), int(np.argmax(short_logits))]
    _, alone_short = prefill([*short, nxt[1]])

    def decode(short_at: int, short_kv):
        mask = np.zeros((2, 7), dtype=np.int64)
        mask[0] = 1
        mask[1, short_at : short_at + 3] = 1
        mask[1, 6] = 1
        feeds = {"input_ids": np.array([[nxt[0]], [nxt[1]]]), "attention_mask": mask}
        for tensors, shorts, longs in zip(layout, short_kv, long_kv):
            for t, s, g in zip(tensors, shorts, longs):
                past = np.zeros(t.shape(2, 6), dtype=t.dtype)
                past[0] = g[0]
                past[1, :, short_at : short_at + 3] = s[0]
                feeds[t.past] = past
        return dict(zip(names, run(None, feeds)))["logits"][1, -1]

    # right-aligned (prefilled at its slots): exact; at slot 0 with holes after: shifted
    np.testing.assert_allclose(decode(3, shifted_kv), alone_short, atol=1e-4)
    assert np.abs(decode(0, short_kv) - alone_short).max() > 1e-3


def test_grouped_query_plain_rows_equal_the_in_place_store(exports):
    """cache="plain" keeps the NumPy rows through session.run on a GroupQueryAttention graph;
    both stores give every request the tokens it gets alone."""
    results = {}
    for cache in ("plain", "auto"):
        engine = Engine(exports["llama-gqa", "ort"], max_running=3, token_budget=6, cache=cache)
        assert engine.kv_store == ("slots" if cache == "plain" else "in_place_slots")
        requests = arrivals(engine, seed=4, count=6, params=greedy)
        results[cache] = [r.token_ids for r in requests]
        # joins of one step: prefilled in one call (the kernel's first-prompt case)
        params = RequestParams(max_tokens=5, temperature=0.0, use_eos=False)
        together = [engine.submit(p, params) for p in ([5, 6], [40, 41, 42, 43], [100, 7])]
        engine.run_until_idle()
        requests += together
        if cache == "auto":
            assert engine.stats()["batched_prefills"] >= 1
        for request in requests:
            tokens, _ = alone(engine.model, request.prompt_ids, request.params.max_tokens)
            assert request.token_ids == tokens
        freed(engine)
    assert results["plain"] == results["auto"]
    assert all(r.token_ids for r in requests)
