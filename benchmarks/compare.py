"""graphattn against the field on SmolLM2-135M, in one run, on this machine.

    GRAPHATTN_EXTRAS=gguf,bench bash scripts/setup.sh
    .venv/bin/python benchmarks/compare.py [--rounds 3] [--prompt-len 512] [--new-tokens 64]

1. Fetch the SmolLM2 GGUF and ``graphattn convert`` it to an HF directory, so every builder
   starts from the same float weights.
2. Export with graphattn (portable and ort fp32; ort fp32 and int4 for onnxruntime 1.30, the
   default, and ``--ort-version 1.32``; ort int4 from the HF directory,
   round-to-nearest like the others, asymmetric (our default) and symmetric (GenAI's
   default); ort int4 lossless from the GGUF) and with ONNX Runtime GenAI's builder (fp32,
   int4) when ``onnxruntime_genai`` is importable — each export in its own process, timed,
   with that process's peak RSS (``os.wait4``).
3. Time prefill (``--prompt-len`` tokens) and greedy decode for every graph with the same
   loop: graphattn's runtime with ``--cache`` (default ``auto``: the in-place shared buffer
   where the graph declares ``past_present_share_buffer``, as GenAI's and our ort graphs
   do; else the bound cache). GenAI's graphs also run in GenAI's own generator ("ORT GenAI
   runtime" rows). Rounds are interleaved so that machine noise hits every model alike; the
   median round is kept. llama.cpp runs the GGUF when ``llama_cpp`` is importable.
4. Print the table and the ratios to GenAI's graph (same loop) at the same precision, then
   the batched-continuation speed of the ort fp32 graphs at both onnxruntime versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_measured(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one child process; raises on failure."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child never blocks
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        if status != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} failed: {log.read().decode()[-500:]}")
    return seconds, usage.ru_maxrss / 1024


def graphattn_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "graphattn", *args]


def smollm2_sources(work: Path) -> tuple[Path, Path]:
    """(the SmolLM2 GGUF, its ``graphattn convert`` HF directory ``work/hf``): every builder
    starts from the same float weights."""
    from graphattn.exporters.fetch import fetch

    gguf = fetch("smollm2-135m")
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    if not hf.exists():
        subprocess.run(
            graphattn_cli("convert", str(gguf), "-o", str(hf)),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return gguf, hf


def genai_builder(hf: Path, out: Path, precision: str, cache: Path) -> list[str]:
    """The command line of ONNX Runtime GenAI's builder exporting ``hf`` for CPU."""
    return [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]


def time_graph(path: Path, prompt: list[int], new_tokens: int, cache: str) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) with graphattn's decode loop and KV cache ``cache``."""
    from graphattn.runtime import Generator, SamplingOptions, Timings

    generator = Generator(path, provider="cpu", cache=cache, max_length=len(prompt) + new_tokens)
    timings = Timings()
    for _ in generator.token_steps(
        [prompt],
        max_new_tokens=new_tokens,
        options=SamplingOptions(),
        stop_ids=set(),
        timings=timings,
    ):
        pass
    t = timings.as_dict()
    return t["prefill_tokens_per_s"], t["decode_tokens_per_s"]


def time_continuation(path: Path, prompt: list[int], rows: int, new_tokens: int) -> float:
    """tok/s (all rows) of a batch of ``rows`` continuing with ``new_tokens`` known tokens
    after a past of ``prompt`` (a second chat turn): one call where the graph takes it
    (GroupQueryAttention with query_seqlens, onnxruntime 1.32+), else one token per call."""
    from graphattn.runtime import Generator

    cache = Generator(path, provider="cpu", max_length=len(prompt) + new_tokens).cache
    ids = np.array([prompt + prompt[:new_tokens]] * rows, dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    cache.reset(rows)
    cache.step(ids[:, : len(prompt)], mask[:, : len(prompt)], positions[:, : len(prompt)])
    started = time.perf_counter()
    cache.step(ids[:, len(prompt) :], mask, positions[:, len(prompt) :])
    return rows * new_tokens / (time.perf_counter() - started)


def time_genai_runtime(path: Path, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of ONNX Runtime GenAI's own generator on its graph."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    generator.generate_next_token()  # the prefill's logits give the first token
    prefill = len(prompt) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        generator.generate_next_token()
    return prefill, (new_tokens - 1) / (time.perf_counter() - started)


def time_llama_cpp(gguf: Path, prompt: list[int], new_tokens: int) -> tuple[float, float] | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(
        str(gguf), n_ctx=len(prompt) + new_tokens + 8, verbose=False, n_threads=os.cpu_count()
    )
    started = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    return prefill, new_tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", default=None, help="keep the exports in this folder")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--cache",
        default="auto",
        choices=["auto", "shared", "bound", "plain"],
        help="graphattn loop's KV cache for every graph (auto: what each graph declares)",
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="graphattn-compare-"))
    gguf, hf = smollm2_sources(work)
    rows: dict[str, dict] = {}

    def export_row(name, precision, command):
        out = work / "".join(c if c.isalnum() else "-" for c in name)
        seconds, rss = run_measured(command(out))
        rows[name] = {
            "model": name,
            "precision": precision,
            "export_s": seconds,
            "export_peak_rss_mb": rss,
            "path": out,
        }

    ours = [  # (row name, precision, source, export flags)
        ("graphattn portable fp32", "fp32", hf, ["--target", "portable"]),
        ("graphattn ort fp32", "fp32", hf, ["--target", "ort"]),
        ("graphattn ort fp32 --ort-version 1.32", "fp32", hf, ["--ort-version", "1.32"]),
        ("graphattn ort int4", "int4", hf, ["--precision", "int4"]),
        (
            "graphattn ort int4 --ort-version 1.32",
            "int4",
            hf,
            ["--precision", "int4", "--ort-version", "1.32"],
        ),
        ("graphattn ort int4 symmetric", "int4", hf, ["--precision", "int4", "--symmetric"]),
        ("graphattn ort int4 (GGUF lossless)", "int4-gguf", gguf, ["--precision", "int4"]),
    ]
    for name, precision, source, flags in ours:
        export_row(
            name,
            precision,
            lambda out, source=source, flags=flags: graphattn_cli(
                "export", str(source), "-o", str(out), *flags, "--quiet"
            ),
        )
    try:
        import onnxruntime_genai  # noqa: F401

        for precision in ("fp32", "int4"):
            export_row(
                f"ORT GenAI builder {precision}",
                precision,
                lambda out, p=precision: genai_builder(hf, out, p, work / "genai-cache"),
            )
    except ImportError:
        print(
            "onnxruntime-genai is not installed: no GenAI rows (install the bench extra)",
            file=sys.stderr,
        )

    vocab = 49152
    prompt = np.random.default_rng(0).integers(100, vocab, size=args.prompt_len).tolist()
    timers = {
        name: (lambda path=row["path"]: time_graph(path, prompt, args.new_tokens, args.cache))
        for name, row in rows.items()
    }
    for name in [n for n in rows if n.startswith("ORT GenAI builder")]:
        runtime_name = name.replace("builder", "runtime")
        rows[runtime_name] = {
            "model": runtime_name,
            "precision": rows[name]["precision"],
            "baseline": False,
        }
        timers[runtime_name] = lambda path=rows[name]["path"]: time_genai_runtime(
            path, prompt, args.new_tokens
        )
    speeds: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    continued = [n for n in rows if n.startswith("graphattn ort fp32")]
    continuation: dict[str, list[float]] = {name: [] for name in continued}
    for _ in range(args.rounds):
        for name, timer in timers.items():
            speeds[name].append(timer())
        for name in continued:
            continuation[name].append(
                time_continuation(rows[name]["path"], prompt[:128], 4, args.new_tokens)
            )
    for name, row in rows.items():
        row["prefill_tok_s"] = statistics.median(s[0] for s in speeds[name])
        row["decode_tok_s"] = statistics.median(s[1] for s in speeds[name])
        row["cache"] = "genai" if name.startswith("ORT GenAI runtime") else args.cache
    cpp = time_llama_cpp(gguf, prompt, args.new_tokens)
    if cpp is not None:
        rows["llama.cpp (Q4_1 GGUF)"] = {
            "model": "llama.cpp (Q4_1 GGUF)",
            "precision": "int4-gguf",
            "prefill_tok_s": cpp[0],
            "decode_tok_s": cpp[1],
        }
    for name in continued:
        rows[name]["batched_continuation_tok_s"] = statistics.median(continuation[name])
    report(list(rows.values()), args)


def report(rows: list[dict], args) -> None:
    baseline = {r["precision"]: r for r in rows if r["model"].startswith("ORT GenAI builder")}
    baseline["int4-gguf"] = baseline.get("int4")
    for row in rows:
        row.pop("path", None)
        base = baseline.get(row["precision"])
        if base is not None and row is not base and row.get("baseline", True):
            for key in ("export_s", "export_peak_rss_mb", "prefill_tok_s", "decode_tok_s"):
                if key in row and key in base:
                    row[f"{key}_vs_genai"] = row[key] / base[key]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"SmolLM2-135M, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.rounds} interleaved rounds, CPU ({os.cpu_count()} cores)"
    )
    header = (
        f"{'model':<36}{'export s':>9}{'peak RSS MB':>12}{'prefill tok/s':>14}"
        f"{'decode tok/s':>13}   vs GenAI (export, RSS, prefill, decode)"
    )
    print(header)
    for r in rows:
        ratios = ", ".join(
            f"{r[k]:.2f}×"
            for k in (
                "export_s_vs_genai",
                "export_peak_rss_mb_vs_genai",
                "prefill_tok_s_vs_genai",
                "decode_tok_s_vs_genai",
            )
            if k in r
        )
        export_s = f"{r['export_s']:.1f}" if "export_s" in r else "-"
        rss = f"{r['export_peak_rss_mb']:.0f}" if "export_peak_rss_mb" in r else "-"
        print(
            f"{r['model']:<36}{export_s:>9}{rss:>12}{r['prefill_tok_s']:>14.1f}"
            f"{r['decode_tok_s']:>13.1f}   {ratios}"
        )
    print(
        f"\nA batch of 4 rows continuing with {args.new_tokens} tokens after a 128-token past"
        " (one call with query_seqlens, else one token per call), tok/s:"
    )
    for r in rows:
        if "batched_continuation_tok_s" in r:
            print(f"{r['model']:<40}{r['batched_continuation_tok_s']:>10.1f}")


if __name__ == "__main__":
    main()
