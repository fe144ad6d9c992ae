"""Serving many streams: our continuous-batching engine against static batches and the field.

    bash scripts/setup_llamacpp.sh        # optional: build llama.cpp's llama-server
    .venv/bin/python benchmarks/serve.py --work /tmp/serve-bench [--json]
        [--streams 1 4 16 32] [--new-tokens 64] [--precisions int4 fp32]
        [--kv-layout contiguous|paged|both] [--gap 0.1] [--prompt-lengths 8 64]
        [--shared-prefix 0] [--rounds 1] [--runners engine static genai llama] [--json-out F]

SmolLM2-135M (the GGUF ``graphattn fetch smollm2-135m`` gives, converted once to an HF
directory so every builder starts from the same float weights: ``compare.py``'s
``smollm2_sources``). Exports, each once into ``--work``: ours (``ort`` target, int4 and fp32;
with ``--kv-layout paged`` also paged ones), ONNX Runtime GenAI's builder (int4, fp32;
``compare.py``'s ``genai_builder``) when ``onnxruntime_genai`` is importable.

For each precision and stream count N: N requests with mixed prompt lengths (seeded, in
``--prompt-lengths``) arrive over time (exponential gaps of mean ``--gap`` seconds, seeded),
each asking for exactly ``--new-tokens`` greedy tokens (EOS ignored); with
``--shared-prefix K`` every prompt starts with the same K tokens (a system prompt, which the
paged engine's prefix sharing can reuse). Runners:

- ``engine``: ``graphattn.runtime.engine.Engine(max_running=N)``, stepped in this process;
  each request is submitted at its arrival time.
- ``static batch``: our ``Generator`` over the N prompts as one left-padded batch; it cannot
  start before the last arrival, so its time to first token includes that wait.
- ``GenAI batch``: ONNX Runtime GenAI's own generator (``batch_size=N``, right-padded as GenAI
  wants) on GenAI's export of the same weights, likewise started at the last arrival.
- ``llama.cpp server``: ``llama-server -m GGUF --parallel N -c N*ctx`` on 127.0.0.1 (its own
  weights: the GGUF's Q4_1 blocks; shown with int4), N concurrent streaming ``/completion``
  requests sent at the same arrival times. Omitted, with the reason, where the binary is
  absent (``--llama-server``, default ``build/llamacpp/bin/llama-server``).

Every runner yields, per request, its arrival and the time of each of its tokens; one
function turns those into the row:

- ``aggregate tok/s``: all completion tokens / seconds from the first arrival to the last
  token (the serving number: a runner that waits, or idles between arrivals, pays for it);
- ``full tok/s``: tokens produced while all N streams were decoding (from the last first
  token to the first finish) / that window; the batching rate at N concurrent streams
  (``-`` where no such window of ≥ 4 tokens a stream exists, e.g. the first request finished
  before the last arrived);
- ``TTFT p50/p99``: arrival → first token (queueing, waiting and prefill included).

Then the ratios: engine / static batch, engine / GenAI batch, engine at N / engine at 1, and
the issue's targets (at 16 streams: ≥ 0.9× our static batch, ≥ 1.4× GenAI's batch; int4 ≥ 3×,
fp32 ≥ 7× one stream). Each run follows a warm-up of its runner on the same N prompts at
once, reversed (2 tokens each: the first calls at those shapes are not timed; reversed so
that no prefix cache holds the timed prompts). ``--rounds R`` runs each
row R times, the runners interleaved, and keeps the round with the best aggregate tok/s
(on a shared machine noise only slows a run down); the JSON lists every round's aggregate.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import genai_builder, graphattn_cli, run_measured, smollm2_sources  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {  # precision -> (× static batch, × GenAI batch, × one stream) at TARGET_STREAMS
    "int4": (0.9, 1.4, 3.0),
    "fp32": (0.9, 1.4, 7.0),
}
TARGET_STREAMS = 16
RUNNER_KINDS = {"engine": "engine", "static": "static", "GenAI": "genai", "llama.cpp": "llama"}
LABELS = ("vs static batch", "vs GenAI batch", "vs engine at 1")


@dataclass
class Trace:
    """One request as a runner served it: seconds from the run's start."""

    arrival: float
    token_times: list[float] = field(default_factory=list)


# ----------------------------------------------------------------- workload
def prompts(
    count: int, vocab: int, seed: int, shortest: int, longest: int, avoid: set[int]
) -> list[list[int]]:
    """``count`` random prompts of lengths in [shortest, longest], without the ids in
    ``avoid`` (a runner's pad id would read as padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(10, vocab, int(rng.integers(shortest, longest + 1)))
        out.append([int(t) if int(t) not in avoid else 11 for t in ids])
    return out


def warm_up(batch: list[list[int]]) -> list[list[int]]:
    """Prompts of the same lengths as ``batch`` that share no prefix with it (reversed): a
    warm-up with the timed prompts would leave them in a prefix cache."""
    return [p[::-1] for p in batch]


def arrival_times(count: int, gap: float, seed: int) -> list[float]:
    """Exponential gaps of mean ``gap`` (seeded); the first request at 0."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(gap, count)) - gap
    return [max(0.0, float(a)) for a in arrivals]


def summarize(traces: list[Trace]) -> dict:
    """The row's numbers from every request's arrival and token times."""
    first = min(t.arrival for t in traces)
    last = max(t.token_times[-1] for t in traces)
    tokens = sum(len(t.token_times) for t in traces)
    ttft = np.array([t.token_times[0] - t.arrival for t in traces])
    start = max(t.token_times[0] for t in traces)  # every stream is decoding from here
    end = min(t.token_times[-1] for t in traces)  # ... until the first one finishes
    inside = [sum(start < s <= end for s in t.token_times) for t in traces]
    full = sum(inside) / (end - start) if end > start and min(inside) >= 4 else None
    return {
        "tokens": tokens,
        "wall_s": last - first,
        "aggregate_tok_s": tokens / (last - first),
        "full_tok_s": full,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
    }


# ----------------------------------------------------------------- runners
def run_engine(engine, batch, arrivals, new_tokens: int) -> list[Trace]:
    """Submit each prompt at its arrival time; step until all finish; a token's time is the
    end of the step that produced it."""
    from graphattn.runtime.engine import RequestParams

    params = RequestParams(max_tokens=new_tokens, temperature=0.0, use_eos=False)
    pending = list(zip(arrivals, batch))
    live = []
    start = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, prompt = pending.pop(0)
            live.append((Trace(arrival), engine.submit(prompt, params)))
        if engine.has_work():
            engine.step()
            now = time.perf_counter() - start
            for trace, request in live:
                trace.token_times += [now] * (request.completion_tokens - len(trace.token_times))
        elif pending:
            time.sleep(max(0.0, pending[0][0] - now))
    return [trace for trace, _ in live]


def run_static(generator, batch, arrivals, new_tokens: int) -> list[Trace]:
    """One left-padded batch started at the last arrival (times shifted by it)."""
    from graphattn.runtime import SamplingOptions, Timings

    offset = max(arrivals)
    traces = [Trace(a) for a in arrivals]
    start = time.perf_counter()
    for chosen in generator.token_steps(
        batch,
        max_new_tokens=new_tokens,
        options=SamplingOptions(),
        stop_ids=set(),
        timings=Timings(),
    ):
        now = offset + time.perf_counter() - start
        for trace, token in zip(traces, chosen):
            if token >= 0:
                trace.token_times.append(now)
    return traces


def run_genai(model, batch, arrivals, new_tokens: int, pad_id: int) -> list[Trace]:
    """ONNX Runtime GenAI's generator over the N prompts as one batch, exactly
    ``new_tokens`` each (min = max length). GenAI pads on the right (``pad_token_id``): each
    row then decodes its own greedy tokens, as alone (checked by hand: left padding does
    not)."""
    import onnxruntime_genai as og

    longest = max(len(p) for p in batch)
    ids = np.full((len(batch), longest), pad_id, dtype=np.int32)
    for row, prompt in enumerate(batch):
        ids[row, : len(prompt)] = prompt
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=longest + new_tokens,
        min_length=longest + new_tokens,
        do_sample=False,
        batch_size=len(batch),
    )
    offset = max(arrivals)
    traces = [Trace(a) for a in arrivals]
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
        now = offset + time.perf_counter() - start
        for trace in traces:
            trace.token_times.append(now)
    return traces


class LlamaServer:
    """``llama-server`` with ``parallel`` slots on a free loopback port (a context manager)."""

    def __init__(
        self, binary: Path, gguf: Path, parallel: int, context: int, log: Path, extra: list[str]
    ):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = open(log, "wb")  # noqa: SIM115 (closed in __exit__)
        threads = str(os.cpu_count() or 1)
        self.process = subprocess.Popen(
            [
                str(binary),
                "-m",
                str(gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--parallel",
                str(parallel),
                "-c",
                str(parallel * context),
                "-t",
                threads,
                "-tb",
                threads,
                "--no-webui",
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> LlamaServer:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.process.returncode}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("llama-server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def stream(self, prompt: list[int], new_tokens: int, trace: Trace, start: float) -> None:
        """One streaming ``/completion`` (greedy, EOS ignored, no prompt cache reuse); a
        token's time is when its server-sent event arrived."""
        body = {
            "prompt": prompt,
            "n_predict": new_tokens,
            "temperature": 0.0,
            "top_k": 1,
            "ignore_eos": True,
            "cache_prompt": False,
            "stream": True,
            "return_tokens": True,
        }
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        connection.request(
            "POST", "/completion", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()!r}")
        for line in response:
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter() - start
            count = len(event.get("tokens") or ()) or (1 if event.get("content") else 0)
            trace.token_times += [now] * count
            if event.get("stop"):
                break
        connection.close()


def run_llama_server(server: LlamaServer, batch, arrivals, new_tokens: int) -> list[Trace]:
    """N threads, each sending its request at its arrival time."""
    traces = [Trace(a) for a in arrivals]
    errors: list[BaseException] = []
    start = time.perf_counter()

    def client(prompt, trace):
        time.sleep(max(0.0, trace.arrival - (time.perf_counter() - start)))
        try:
            server.stream(prompt, new_tokens, trace, start)
        except BaseException as error:  # noqa: BLE001 (re-raised below, in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=client, args=pair) for pair in zip(batch, traces)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return traces


# ----------------------------------------------------------------- exports
def engine_layouts(choice: str) -> list[str]:
    """The KV layouts the engine rows run on (``--kv-layout``)."""
    return ["contiguous", "paged"] if choice == "both" else [choice]


def export_all(args, work: Path, hf: Path) -> dict[tuple[str, str], Path]:
    """{(builder, precision): export dir}, each built once into ``work`` (reused after)."""
    jobs: dict[tuple[str, str], list[str]] = {}
    layouts = sorted({"contiguous", *engine_layouts(args.kv_layout)})  # static: contiguous
    for precision in args.precisions:
        flags = ["--precision", precision] if precision != "fp32" else []
        if args.ort_version:
            flags += ["--ort-version", args.ort_version]
        for layout in layouts:
            out = work / f"ours-{precision}-{layout}"
            layout_flags = ["--kv-layout", "paged"] if layout == "paged" else []
            jobs[(f"ours-{layout}", precision)] = graphattn_cli(
                "export", str(hf), "-o", str(out), "--target", "ort", *flags, *layout_flags
            ) + ["--quiet"]
    try:
        import onnxruntime_genai  # noqa: F401

        for precision in args.precisions:
            out = work / f"genai-{precision}"
            jobs[("genai", precision)] = genai_builder(hf, out, precision, work / "genai-cache")
    except ImportError:
        print("no GenAI rows: onnxruntime-genai is not installed (test extra)", file=sys.stderr)
    built = {}
    for key, command in jobs.items():
        out = Path(command[command.index("-o") + 1])
        if not (out / "model.onnx").is_file():
            try:
                seconds, rss = run_measured(command)
                print(f"exported {out.name}: {seconds:.1f} s, peak RSS {rss:.0f} MB", flush=True)
            except RuntimeError as error:
                print(f"no rows for {out.name}: export failed: {error}", file=sys.stderr)
                continue
        built[key] = out
    return built


def genai_pad_id(path: Path) -> int:
    config = json.loads((path / "genai_config.json").read_text())
    pad = config["model"].get("pad_token_id", 0)
    return int(pad[0] if isinstance(pad, list) else pad)


# ----------------------------------------------------------------- the run
def measure(args, exports, gguf: Path, work: Path) -> list[dict]:
    """Every (precision, streams, runner) row, in that order."""
    from graphattn.runtime import Generator
    from graphattn.runtime.engine import Engine

    llama = Path(args.llama_server or ROOT / "build/llamacpp/bin/llama-server")
    if not llama.is_file():
        print(
            f"no llama.cpp rows: {llama} is absent (bash scripts/setup_llamacpp.sh builds it)",
            flush=True,
        )
    rows = []
    context = args.shared_prefix + args.prompt_lengths[1] + args.new_tokens + 16
    for precision in args.precisions:
        runners = {}  # name -> runner(batch, arrivals, streams) -> traces
        for layout in engine_layouts(args.kv_layout):
            path = exports.get((f"ours-{layout}", precision))
            if path is None:
                continue
            engines: dict[int, Engine] = {}

            def engine_runner(batch, arrivals, n, path=path, engines=engines):
                if n not in engines:
                    engines.clear()  # one engine (and its cache) at a time
                    engines[n] = Engine(
                        path,
                        max_running=n,
                        token_budget=max(args.token_budget, n),
                        threads=args.threads,
                    )
                run_engine(engines[n], warm_up(batch), [0.0] * n, 2)  # warm-up
                return run_engine(engines[n], batch, arrivals, args.new_tokens)

            runners["engine" if layout == "contiguous" else "engine (paged)"] = engine_runner
        path = exports.get(("ours-contiguous", precision))
        if path is not None:
            generator = Generator(  # its cache holds just what the batch needs, as GenAI's
                path, provider="cpu", threads=args.threads, max_length=context
            )

            def static_runner(batch, arrivals, n, generator=generator):
                run_static(generator, warm_up(batch), [0.0] * n, 2)  # warm-up
                return run_static(generator, batch, arrivals, args.new_tokens)

            runners["static batch"] = static_runner
        genai_path = exports.get(("genai", precision))
        pads = set()
        if genai_path is not None:
            import onnxruntime_genai as og

            genai_model = og.Model(str(genai_path))
            pad_id = genai_pad_id(genai_path)
            pads.add(pad_id)

            def genai_runner(batch, arrivals, n, model=genai_model, pad=pad_id):
                run_genai(model, warm_up(batch), [0.0] * n, 2, pad)  # warm-up
                return run_genai(model, batch, arrivals, args.new_tokens, pad)

            runners["GenAI batch"] = genai_runner
        if precision == "int4" and llama.is_file():

            def llama_runner(batch, arrivals, n):
                log = work / "llama-server.log"
                extra = args.llama_args.split()
                with LlamaServer(llama, gguf, n, context, log, extra) as server:
                    run_llama_server(server, warm_up(batch), [0.0] * n, 2)  # warm-up
                    return run_llama_server(server, batch, arrivals, args.new_tokens)

            runners[f"llama.cpp server ({gguf_quant(gguf)} GGUF)"] = llama_runner
        size = args.shared_prefix
        prefix = prompts(1, 49152, args.seed + 9999, size, size, pads)[0]
        chosen = {k: r for k, r in runners.items() if RUNNER_KINDS[k.split()[0]] in args.runners}
        for n in args.streams:
            batch = prompts(n, 49152, args.seed + n, *args.prompt_lengths, avoid=pads)
            batch = [prefix + p for p in batch]
            arrivals = arrival_times(n, args.gap, args.seed)
            tries: dict[str, list[dict]] = {name: [] for name in chosen}
            for _ in range(args.rounds):  # interleaved: noise hits every runner alike
                for name, runner in chosen.items():
                    try:
                        tries[name].append(summarize(runner(batch, arrivals, n)))
                    except Exception as error:  # noqa: BLE001 (a failed runner is a printed row)
                        print(f"| {precision} | {n} | {name} | failed: {error} |", flush=True)
            for name, results in tries.items():
                if not results:
                    continue
                row = {"precision": precision, "streams": n, "runner": name}
                row.update(max(results, key=lambda r: r["aggregate_tok_s"]))
                row["rounds_aggregate_tok_s"] = [r["aggregate_tok_s"] for r in results]
                rows.append(row)
                if not args.json:
                    print(format_row(row), flush=True)
    return rows


def cpu_name() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gguf_quant(gguf: Path) -> str:
    """The quantization named in the file name (``...Q4_1.gguf`` → ``Q4_1``)."""
    return gguf.stem.rsplit(".", 1)[-1]


def format_row(row: dict) -> str:
    full = f"{row['full_tok_s']:.1f}" if row["full_tok_s"] is not None else "-"
    return (
        f"| {row['precision']} | {row['streams']} | {row['runner']} | "
        f"{row['aggregate_tok_s']:.1f} | {full} | {row['ttft_p50_s']:.3f} | "
        f"{row['ttft_p99_s']:.3f} | {row['wall_s']:.2f} |"
    )


def ratios(rows: list[dict]) -> list[dict]:
    """engine / static batch, engine / GenAI batch, engine at N / engine at 1 — on both the
    aggregate and the full-concurrency rate."""
    by = {(r["precision"], r["streams"], r["runner"]): r for r in rows}
    out = []
    for r in rows:
        if not r["runner"].startswith("engine"):
            continue
        key = r["precision"], r["streams"]
        one = by.get((r["precision"], 1, r["runner"])) if r["streams"] != 1 else None
        others = (by.get((*key, "static batch")), by.get((*key, "GenAI batch")), one)
        pairs = dict(zip(LABELS, others))
        entry = {"precision": r["precision"], "streams": r["streams"], "runner": r["runner"]}
        for label, other in pairs.items():
            for metric in ("aggregate_tok_s", "full_tok_s"):
                if other is not None and r[metric] and other[metric]:
                    entry[f"{metric} {label}"] = r[metric] / other[metric]
        out.append(entry)
    return out


def verdicts(table: list[dict]) -> list[str]:
    """The issue's targets at TARGET_STREAMS, judged on each metric."""
    lines = []
    for entry in table:
        if entry["streams"] != TARGET_STREAMS or entry["precision"] not in TARGETS:
            continue
        goals = dict(
            zip(
                ("vs static batch", "vs GenAI batch", "vs engine at 1"), TARGETS[entry["precision"]]
            )
        )
        for label, goal in goals.items():
            for metric, word in (("aggregate_tok_s", "aggregate"), ("full_tok_s", "full")):
                value = entry.get(f"{metric} {label}")
                if value is None:
                    continue
                mark = "met" if value >= goal else "NOT met"
                lines.append(
                    f"{entry['precision']} {entry['runner']} at {TARGET_STREAMS}, {word} tok/s "
                    f"{label}: {value:.2f}× (target ≥ {goal}×) {mark}"
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path.home() / ".cache/graphattn/serve-bench"))
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["int4", "fp32"], choices=TARGETS)
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[8, 64])
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="every prompt starts with the same this many tokens (a system prompt)",
    )
    parser.add_argument("--gap", type=float, default=0.1, help="mean seconds between arrivals")
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds per row, interleaved; the best is kept"
    )
    parser.add_argument(
        "--kv-layout",
        default="contiguous",
        choices=["contiguous", "paged", "both"],
        help="the engine's export: contiguous (per-slot rows), paged ('engine (paged)' rows)"
        " or both; the static batch always runs the contiguous export",
    )
    parser.add_argument("--ort-version", default=None, help="our exports' --ort-version")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument(
        "--llama-args", default="", help="more llama-server arguments (--llama-args='-fa on')"
    )
    parser.add_argument(
        "--runners",
        nargs="+",
        default=list(RUNNER_KINDS.values()),
        choices=list(RUNNER_KINDS.values()),
        help="which runners (default all)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()

    work = Path(args.work)
    gguf, hf = smollm2_sources(work)
    exports = export_all(args, work, hf)
    shared = f" after a shared prefix of {args.shared_prefix}" if args.shared_prefix else ""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        f"SmolLM2-135M, {started}, {cpu_name()}, {os.cpu_count()} cores; "
        f"{args.new_tokens} new tokens, prompts {args.prompt_lengths[0]}-"
        f"{args.prompt_lengths[1]}{shared}, arrivals {args.gap} s apart on average, "
        f"seed {args.seed}"
    )
    if not args.json:
        print(header)
        print(
            "| precision | streams | runner | aggregate tok/s | full tok/s | TTFT p50 s"
            " | TTFT p99 s | wall s |"
        )
        print("|---|---|---|---|---|---|---|---|")
    rows = measure(args, exports, gguf, work)
    table = ratios(rows)
    lines = verdicts(table)
    result = {"setup": header, "command": sys.argv, "rows": rows, "ratios": table}
    result["targets"] = lines
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
        return
    if table:
        print("\n| precision | streams | runner | ratio | aggregate | full |")
        print("|---|---|---|---|---|---|")
    for entry in table:
        for label in LABELS:
            values = [entry.get(f"{m} {label}") for m in ("aggregate_tok_s", "full_tok_s")]
            if any(v is not None for v in values):
                shown = [f"{v:.2f}×" if v is not None else "-" for v in values]
                print(
                    f"| {entry['precision']} | {entry['streams']} | {entry['runner']} | "
                    f"{label} | {shown[0]} | {shown[1]} |"
                )
    if lines:
        print(f"\nTargets at {TARGET_STREAMS} streams:")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
