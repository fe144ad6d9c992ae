"""Measure prefill and decode speed of an export: random prompt ids, greedy, one row.

Each cache mode runs in the same process on the same prompt; peak RSS is this process's.
"""

from __future__ import annotations

import resource
import time

import numpy as np

from graphattn.runtime.generate import Generator, Timings
from graphattn.runtime.sampling import SamplingOptions
from graphattn.runtime.session import ModelSession


def bench_prompt(vocab_size: int, length: int) -> list[int]:
    """The prompt ``bench`` times: ``length`` random token ids below ``vocab_size``, seed 0
    (other engines timed against ours use the same one)."""
    return np.random.default_rng(0).integers(0, vocab_size, size=length).tolist()


def bench(
    path: str,
    *,
    prompt_len: int = 128,
    new_tokens: int = 64,
    provider: str = "auto",
    threads: int | None = None,
    caches: tuple[str, ...] | None = None,
    repeats: int = 1,
) -> list[dict]:
    """One row per cache mode (None: every mode the graph supports): prefill/decode tokens/s,
    time to first token, peak RSS."""
    model = ModelSession(path, provider=provider, threads=threads)
    if caches is None:
        caches = ("shared", "bound", "plain") if model.shares_kv_buffer else ("bound", "plain")
    vocab = model.config.vocab_size or 1000
    prompt = bench_prompt(vocab, prompt_len)
    rows = []
    for cache in caches:
        generator = Generator(model, cache=cache, max_length=prompt_len + new_tokens)
        best = None
        for _ in range(repeats + 1):  # the first run warms up
            timings = Timings()
            started = time.perf_counter()
            first = None
            steps = generator.token_steps(
                [prompt],
                max_new_tokens=new_tokens,
                options=SamplingOptions(),
                stop_ids=set(),
                timings=timings,
            )
            for _token in steps:
                first = first or time.perf_counter() - started
            result = timings.as_dict() | {"time_to_first_token_s": first}
            if best is None or result["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
                best = result
        rows.append(
            {
                "cache": cache,
                "device": model.device,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "prefill_tok_s": best["prefill_tokens_per_s"],
                "decode_tok_s": best["decode_tokens_per_s"],
                "ttft_s": best["time_to_first_token_s"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`bench` rows."""
    header = (
        f"{'cache':<7}{'device':<7}{'prefill tok/s':>14}{'decode tok/s':>14}"
        f"{'TTFT ms':>9}{'peak RSS MB':>13}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['cache']:<7}{r['device']:<7}{r['prefill_tok_s']:>14.1f}{r['decode_tok_s']:>14.1f}"
            f"{r['ttft_s'] * 1000:>9.1f}{r['peak_rss_mb']:>13.0f}"
        )
    return "\n".join(lines)
