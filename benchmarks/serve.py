"""Continuous batching (runtime/engine.py) against our static batch of the same size.

    .venv/bin/python benchmarks/serve.py /tmp/smol --streams 1 4 16 --new-tokens 32

For each stream count N: N requests with mixed prompt lengths (seeded) arrive over time
(exponential gaps of mean ``--gap`` seconds, default 0.25); the engine
(``max_running=N``) admits each on arrival and runs until all finish. The static batch is
``Generator.generate`` over the same N prompts at once: it cannot start before the last
arrival, so its time to first token is that wait plus its prefill. Reported: aggregate
tok/s (completion tokens / wall seconds from the first arrival to the last token), p50/p99
time to first token. One run per row (the machine is shared; numbers are indicative).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from graphattn.runtime import Generator
from graphattn.runtime.engine import Engine, RequestParams


def prompts(count: int, vocab: int, seed: int, shortest: int, longest: int) -> list[list[int]]:
    """``count`` random prompts of lengths in [shortest, longest]."""
    rng = np.random.default_rng(seed)
    return [
        [int(t) for t in rng.integers(10, vocab, int(rng.integers(shortest, longest + 1)))]
        for _ in range(count)
    ]


def run_engine(engine: Engine, batch, arrivals, new_tokens: int) -> dict:
    """Submit each prompt at its arrival time, step until all finish."""
    params = RequestParams(max_tokens=new_tokens, temperature=0.0, use_eos=False)
    start = time.perf_counter()
    pending = list(zip(arrivals, batch))
    requests = []
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, prompt = pending.pop(0)
            requests.append((arrival, engine.submit(prompt, params)))
        if engine.has_work():
            engine.step()
        elif pending:
            time.sleep(max(0.0, pending[0][0] - now))
    wall = time.perf_counter() - start
    ttft = [r.first_token_at - start - a for a, r in requests]
    tokens = sum(r.completion_tokens for _, r in requests)
    return {"tok_s": tokens / wall, "ttft": ttft, "wall": wall}


def run_static(generator: Generator, batch, arrivals, new_tokens: int) -> dict:
    """One left-padded batch started at the last arrival."""
    started = time.perf_counter()
    results = generator.generate(batch, max_new_tokens=new_tokens, use_eos=False)
    elapsed = time.perf_counter() - started
    prefill = results[0].timings["prefill_seconds"]
    last = max(arrivals)
    ttft = [last - a + prefill for a in arrivals]
    tokens = sum(len(r.token_ids) for r in results)
    return {"tok_s": tokens / (last + elapsed), "ttft": ttft, "wall": last + elapsed}


def main() -> None:
    """Parse arguments, run each stream count, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--gap", type=float, default=0.25, help="mean seconds between arrivals")
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    engines: dict[int, Engine] = {}
    first = Engine(args.export, max_running=max(args.streams), threads=args.threads)
    generator = Generator(first.model)
    vocab = first.model.config.vocab_size or 1000
    print(f"export {args.export}  new tokens {args.new_tokens}  prompts {args.prompt_lengths}")
    print(f"slot positions (GroupQueryAttention joins): {first.slot_positions}")
    print("| streams | runner | aggregate tok/s | TTFT p50 s | TTFT p99 s | wall s |")
    print("|---|---|---|---|---|---|")
    for streams in args.streams:
        engine = engines.setdefault(
            streams,
            Engine(
                first.model.export_dir,
                max_running=streams,
                token_budget=max(args.token_budget, streams),
                threads=args.threads,
            ),
        )
        batch = prompts(streams, vocab, args.seed + streams, *args.prompt_lengths)
        rng = np.random.default_rng(args.seed)
        arrivals = list(np.cumsum(rng.exponential(args.gap, streams)) - args.gap)
        arrivals = [max(0.0, float(a)) for a in arrivals]
        run_engine(engine, batch[:1], [0.0], 2)  # warm-up
        generator.generate(batch[:1], max_new_tokens=2, use_eos=False)
        for name, result in (
            ("engine", run_engine(engine, batch, arrivals, args.new_tokens)),
            ("static batch", run_static(generator, batch, arrivals, args.new_tokens)),
        ):
            ttft = np.array(result["ttft"])
            print(
                f"| {streams} | {name} | {result['tok_s']:.1f} | {np.percentile(ttft, 50):.3f}"
                f" | {np.percentile(ttft, 99):.3f} | {result['wall']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
