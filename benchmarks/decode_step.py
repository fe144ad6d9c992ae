"""Where a decode step's time goes: median step time of exported decoders under graphattn's
runtime, and (``--profile``) onnxruntime's per-op kernel time for decode steps only.

    .venv/bin/python benchmarks/decode_step.py EXPORT[:CACHE] [EXPORT[:CACHE] ...]
        [--prompt-len 512] [--steps 64] [--rounds 5] [--profile]

Each export gets the same random prompt; after its prefill, ``--steps`` single-token steps
run through the KV cache (``auto`` unless ``:shared``/``:bound``/``:plain`` follows the
path), and the median step time is one round's figure. Rounds are interleaved across the
exports so that machine noise hits them alike; the table gives the median and the best
round. A NumPy read of the fp32 weights' size is printed alongside, as the memory-bandwidth
floor that an fp32 step cannot beat.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphattn.runtime import Generator, ModelSession
from graphattn.runtime.generate import positions


def step_times(generator: Generator, prompt_BS: np.ndarray, steps: int) -> list[float]:
    """Seconds of each single-token step after a prefill of ``prompt_BS``."""
    cache = generator.cache
    cache.reset(prompt_BS.shape[0])
    mask = np.ones_like(prompt_BS)
    cache.step(prompt_BS, mask, positions(mask, prompt_BS.shape[1]))
    token = np.full((prompt_BS.shape[0], 1), 7, dtype=np.int64)
    times = []
    for _ in range(steps):
        mask = np.ones((prompt_BS.shape[0], cache.length + 1), dtype=np.int64)
        started = time.perf_counter()
        cache.step(token, mask, positions(mask, 1))
        times.append(time.perf_counter() - started)
    return times


def kernel_profile(path: str, cache: str, prompt_BS: np.ndarray, steps: int) -> dict[str, float]:
    """Milliseconds per decode step by op type (onnxruntime's profiler, prefill excluded)."""
    model = ModelSession(path, provider="cpu")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="decode-step-")) / "profile")
    options.log_severity_level = 3
    model.session = ort.InferenceSession(
        str(model.config.model_path), options, providers=["CPUExecutionProvider"]
    )
    generator = Generator(model, cache=cache, max_length=prompt_BS.shape[1] + steps + 1)
    step_times(generator, prompt_BS, steps)
    profile_path = Path(model.session.end_profiling())
    events = json.loads(profile_path.read_text())
    shutil.rmtree(profile_path.parent)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    prefill_end = min(e["ts"] + e["dur"] for e in runs)
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if (
            event.get("cat") == "Node"
            and event["name"].endswith("_kernel_time")
            and event["ts"] > prefill_end
        ):
            by_op[event["args"]["op_name"]] += event["dur"] / 1000 / steps
    return dict(by_op.most_common())


def read_bandwidth_floor(megabytes: float = 540.0) -> float:
    """Milliseconds for NumPy to read ``megabytes`` of float32 once (best of 5)."""
    array = np.ones(int(megabytes * 1e6 / 4), dtype=np.float32)
    array.sum()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        array.sum()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _export_and_cache(spec: str) -> tuple[str, str]:
    path, colon, cache = spec.rpartition(":")
    return (
        (path, cache) if colon and cache in ("auto", "shared", "bound", "plain") else (spec, "auto")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="EXPORT_DIR[:auto|shared|bound|plain]")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="per-op kernel time too")
    args = parser.parse_args()
    specs = [_export_and_cache(spec) for spec in args.exports]
    prompt = np.random.default_rng(0).integers(100, 1000, size=(1, args.prompt_len))
    capacity = args.prompt_len + args.steps + 1
    generators = {
        f"{path} ({cache})": Generator(path, provider="cpu", cache=cache, max_length=capacity)
        for path, cache in specs
    }
    rounds: dict[str, list[float]] = {name: [] for name in generators}
    for _ in range(args.rounds):
        for name, generator in generators.items():
            rounds[name].append(statistics.median(step_times(generator, prompt, args.steps)))
    print(f"decode step after a {args.prompt_len}-token prompt, {args.rounds} interleaved rounds")
    for name, values in rounds.items():
        print(
            f"  {name:<60} median {statistics.median(values) * 1000:6.2f} ms"
            f"  best {min(values) * 1000:6.2f} ms"
        )
    print(f"NumPy reading 540 MB (SmolLM2's fp32 weights) once: {read_bandwidth_floor():.1f} ms")
    if args.profile:
        for path, cache in specs:
            profile = kernel_profile(path, cache, prompt, args.steps)
            print(f"{path} ({cache}): kernels {sum(profile.values()):.2f} ms per step")
            for op, ms in list(profile.items())[:8]:
                print(f"  {op:<36}{ms:7.3f} ms")


if __name__ == "__main__":
    main()
