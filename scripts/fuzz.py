"""Fuzz graphattn's readers of untrusted input (targets in tests/fuzz_targets.py).

    python scripts/fuzz.py --target gguf --seconds 600          # the long run
    python scripts/fuzz.py --target all --runs 2000 --seed 0    # bounded and seeded, as in CI

Each target runs in a worker process: atheris (libFuzzer, coverage-guided, with our structure-
aware mutators as half of its custom mutator) when it is installed, else a seeded random-
mutation loop (``--engine random``). This parent process watches the worker: a worker that stops
reporting (a hang in C code, which the per-input alarm cannot interrupt) or grows past
``--rss-mb`` is killed and its current input recorded. Prints inputs tried, time and findings;
``--json`` writes them, ``--save-findings DIR`` keeps each finding's input. Exit status 1 when
there is a finding.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TARGET_NAMES = ("gguf", "gguf-checkpoint", "safetensors", "config")
FLUSH_S = 0.5  # the worker rewrites stats.json at most this often
HANG_S = 15.0  # a worker whose stats are older than this is hung (the per-input limit is 2 s)
MAX_RESTARTS = 10  # new workers after a hang or crash, per target
STARTUP_S = 180.0  # imports, instrumentation and seeds, before the first input


# ---------------------------------------------------------------------------------------------
# worker


class Recorder:
    """Counts inputs, writes each new finding (first input per signature) and stats.json."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        (workdir / "findings").mkdir(parents=True, exist_ok=True)
        self.inputs = 0
        self.counts: dict[str, int] = {}
        self.first_input_time: float | None = None
        self.last_flush = 0.0

    def record(self, data: bytes, finding: Any) -> None:
        """One input done, with its Finding or None."""
        if self.first_input_time is None:
            self.first_input_time = time.time()
        self.inputs += 1
        if finding is not None:
            signature = finding.signature
            if signature not in self.counts:
                digest = hashlib.sha1(signature.encode()).hexdigest()[:12]
                record = {**finding.to_json(), "signature": signature}
                (self.workdir / "findings" / f"{digest}.json").write_text(json.dumps(record))
            self.counts[signature] = self.counts.get(signature, 0) + 1
        if time.monotonic() - self.last_flush > FLUSH_S:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Write stats.json atomically."""
        self.last_flush = time.monotonic()
        stats = {
            "inputs": self.inputs,
            "first_input_time": self.first_input_time,
            "time": time.time(),
            "counts": self.counts,
            "final": final,
        }
        temporary = self.workdir / "stats.json.tmp"
        temporary.write_text(json.dumps(stats))
        os.replace(temporary, self.workdir / "stats.json")


def worker(args: argparse.Namespace) -> None:
    """Fuzz one target in this process (started by :func:`run_target`)."""
    sys.path.insert(0, str(TESTS))
    workdir = Path(args.workdir)
    recorder = Recorder(workdir)
    recorder.flush()
    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["graphattn"]):
            import fuzz_targets  # imports the graphattn modules under test: instrumented
    else:
        import fuzz_targets
    target = fuzz_targets.TARGETS[args.target]
    scratch = fuzz_targets.Scratch(workdir / "scratch")
    seeds = target.seeds(workdir / "seeds")
    # a huge allocation fails at once (MemoryError: a finding) instead of paging for minutes
    # faster than the parent's RSS watch can stop it (Linux: /proc gives the current size)
    vm_bytes = _vm_bytes(os.getpid())
    if vm_bytes:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + args.rss_mb * 2**20, hard))

    def test_one_input(data: bytes) -> None:
        recorder.record(data, fuzz_targets.check(target, data, scratch))

    if args.engine == "random":
        fuzz_targets.random_loop(
            target,
            scratch,
            seeds,
            recorder.record,
            seed=args.seed,
            runs=args.runs,
            seconds=args.seconds,
        )
        recorder.flush(final=True)
        return

    corpus = workdir / "corpus"
    corpus.mkdir(exist_ok=True)
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index}").write_bytes(seed)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return target.mutate(data, rng, max_size, seeds)

    argv = [
        sys.argv[0],
        f"-seed={args.seed}",
        "-timeout=0",  # our own per-input alarm; libFuzzer's would take over SIGALRM
        "-rss_limit_mb=0",  # the parent watches the worker's RSS
        f"-max_len={max(target.max_len, *(len(s) for s in seeds))}",
        f"-artifact_prefix={workdir}/",
        "-print_final_stats=1",
    ]
    if args.runs is not None:
        argv.append(f"-runs={args.runs}")
    if args.seconds is not None:
        argv.append(f"-max_total_time={max(1, round(args.seconds))}")
    atheris.Setup([*argv, str(corpus)], test_one_input, custom_mutator=mutator)
    atheris.Fuzz()  # never returns: libFuzzer exits the process


# ---------------------------------------------------------------------------------------------
# parent


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_mb(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def _vm_bytes(pid: int) -> int:
    return _status_kib(pid, "VmSize") * 1024


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _current_input(workdir: Path) -> bytes:
    inputs = sorted((workdir / "scratch").glob("input-*"), key=lambda p: p.stat().st_mtime)
    return inputs[-1].read_bytes() if inputs else b""


def _run_worker(
    name: str,
    engine: str,
    *,
    seconds: float | None,
    runs: int | None,
    seed: int,
    rss_mb: int,
    workdir: Path,
) -> dict[str, Any]:
    """One worker process, watched: its stats, log, and why it was killed or crashed."""
    for stale in [workdir / "stats.json", *workdir.glob("crash-*")]:
        stale.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--target", name]
    command += ["--engine", engine, "--seed", str(seed), "--workdir", str(workdir)]
    command += ["--rss-mb", str(rss_mb)]
    if seconds is not None:
        command += ["--seconds", str(seconds)]
    if runs is not None:
        command += ["--runs", str(runs)]
    log_path = workdir / "worker.log"
    started = time.monotonic()
    limit = STARTUP_S + (seconds or 0) * 1.5 + 60
    killed = ""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        while process.poll() is None:
            time.sleep(0.2)
            stats = _read_json(workdir / "stats.json") or {}
            if _rss_mb(process.pid) > rss_mb:
                killed = f"worker RSS above {rss_mb} MiB"
            elif stats.get("first_input_time") and time.time() - stats["time"] > HANG_S:
                killed = f"no input finished for {HANG_S:.0f} s (a hang)"
            elif time.monotonic() - started > limit:
                killed = f"worker ran past {limit:.0f} s"
            if killed:
                process.send_signal(signal.SIGKILL)
                process.wait()
    stats = _read_json(workdir / "stats.json") or {}
    log_text = log_path.read_text(errors="replace")
    inputs = int(stats.get("inputs", 0))
    done = re.findall(r"Done (\d+) runs in (\d+) second", log_text)
    if done:
        inputs = max(inputs, int(done[-1][0]))
    first = stats.get("first_input_time")
    result = {
        "inputs": inputs,
        "fuzz_seconds": time.time() - first if first else 0.0,
        "counts": stats.get("counts", {}),
        "failure": None,
    }
    if killed or process.returncode != 0:
        artifacts = sorted(workdir.glob("crash-*")) + sorted(workdir.glob("oom-*"))
        data = artifacts[0].read_bytes() if artifacts else _current_input(workdir)
        reason = killed or f"worker exited with status {process.returncode}"
        result["failure"] = {
            "target": name,
            "kind": "hang" if "hang" in reason else "crash",
            "error": "",
            "message": reason,
            "where": "",
            "log_tail": log_text[-3000:],
            "size": len(data),
            "input_hex": data.hex(),
            "signature": f"{name}|worker|{reason}|{hashlib.sha1(data).hexdigest()}",
            "count": 1,
        }
    return result


def run_target(
    name: str,
    engine: str,
    *,
    seconds: float | None,
    runs: int | None,
    seed: int,
    rss_mb: int,
    workdir: Path,
) -> dict[str, Any]:
    """Fuzz target ``name`` in worker processes; the summary (inputs, seconds, findings).

    A worker that hangs or crashes is a finding, and a new worker (seed + 1) takes over for
    the time or runs left, up to MAX_RESTARTS times."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("findings/*.json"):
        stale.unlink()
    started = time.monotonic()
    inputs, fuzz_seconds = 0, 0.0
    counts: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    for attempt in range(MAX_RESTARTS + 1):
        left_s = None if seconds is None else seconds - (time.monotonic() - started)
        left_runs = None if runs is None else runs - inputs
        if (left_s is not None and left_s < 1) or (left_runs is not None and left_runs < 1):
            break
        result = _run_worker(
            name,
            engine,
            seconds=left_s,
            runs=left_runs,
            seed=seed + attempt,
            rss_mb=rss_mb,
            workdir=workdir,
        )
        inputs += result["inputs"]
        fuzz_seconds += result["fuzz_seconds"]
        for signature, count in result["counts"].items():
            counts[signature] = counts.get(signature, 0) + count
        if result["failure"] is None:
            break
        failures.append(result["failure"])
    findings = [
        record
        for path in sorted((workdir / "findings").glob("*.json"))
        if (record := _read_json(path)) is not None
    ]
    for record in findings:
        record["count"] = counts.get(record["signature"], 1)
    return {
        "target": name,
        "engine": engine,
        "seed": seed,
        "inputs": inputs,
        "fuzz_seconds": round(fuzz_seconds, 2),
        "wall_seconds": round(time.monotonic() - started, 2),
        "restarts": len(failures),
        "findings": findings + failures,
        "workdir": str(workdir),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    seconds = summary["fuzz_seconds"]
    rate = summary["inputs"] / seconds if seconds else 0.0
    print(
        f"{summary['target']:<16} {summary['engine']:<8} {summary['inputs']:>10,} inputs"
        f" in {seconds:8.1f} s ({rate:,.0f}/s, {summary['wall_seconds']:.1f} s wall),"
        f" {len(summary['findings'])} finding(s)"
    )
    for record in summary["findings"]:
        print(f"  [{record['kind']}] {record['error']} at {record['where']} (×{record['count']})")
        print(f"      {record['message'][:300]}")
        print(f"      input ({record['size']} bytes): {record['input_hex'][:160]}")
        if "saved" in record:
            print(f"      saved: {record['saved']}")


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="all", choices=(*TARGET_NAMES, "all"))
    parser.add_argument("--seconds", type=float, default=None, help="per target")
    parser.add_argument("--runs", type=int, default=None, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="auto", choices=("auto", "atheris", "random"))
    parser.add_argument("--rss-mb", type=int, default=4096, help="kill a worker above this")
    parser.add_argument("--json", type=Path, help="write the summaries here")
    parser.add_argument("--save-findings", type=Path, help="write each finding's input here")
    parser.add_argument("--workdir", type=Path, help="keep worker files here (default: temp)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.seconds is None and args.runs is None:
        args.seconds = 60.0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    names = TARGET_NAMES if args.target == "all" else (args.target,)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="graphattn-fuzz-") as temporary:
        root = args.workdir or Path(temporary)
        for name in names:
            summary = run_target(
                name,
                engine,
                seconds=args.seconds,
                runs=args.runs,
                seed=args.seed,
                rss_mb=args.rss_mb,
                workdir=root / name,
            )
            if args.save_findings:
                args.save_findings.mkdir(parents=True, exist_ok=True)
                for record in summary["findings"]:
                    digest = hashlib.sha1(record["signature"].encode()).hexdigest()[:8]
                    path = args.save_findings / f"{name}-{record['kind']}-{digest}.bin"
                    path.write_bytes(bytes.fromhex(record["input_hex"]))
                    record["saved"] = str(path)
            _print_summary(summary)
            summaries.append(summary)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))
    return 1 if any(summary["findings"] for summary in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
