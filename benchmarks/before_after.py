"""A redesign's speed check, in one run: SmolLM2-135M exported by an earlier graphattn and by
this one, each graph timed with the same decode loop (this checkout's runtime) in interleaved
rounds, plus each export's time and peak RSS.

    git worktree add /tmp/before <commit>
    python3 -m venv /tmp/before/.venv && /tmp/before/.venv/bin/pip install --no-deps -e /tmp/before
    SITE='import site; print(site.getsitepackages()[0])'
    .venv/bin/python -c "$SITE" > "$(/tmp/before/.venv/bin/python -c "$SITE")/main.pth"
    .venv/bin/python benchmarks/before_after.py --before-python /tmp/before/.venv/bin/python

(the ``.pth`` line lends the earlier checkout this venv's dependencies; run it outside the
repository root so that each interpreter imports its own graphattn). Exports: ``ort`` fp32 and
int4 (lossless from the GGUF) and ``portable`` fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from compare import run_measured, time_graph  # noqa: E402

EXPORTS = {
    "ort fp32": ["--target", "ort"],
    "ort int4": ["--target", "ort", "--precision", "int4"],
    "portable fp32": ["--target", "portable"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-python", required=True, help="python of the earlier checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    from graphattn.exporters.fetch import fetch

    gguf = fetch("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="before-after-"))
    rows = []
    for label, python in (("before", args.before_python), ("after", sys.executable)):
        for name, flags in EXPORTS.items():
            out = work / f"{label}-{name.replace(' ', '-')}"
            command = [python, "-m", "graphattn", "export", str(gguf), "-o", str(out), *flags]
            seconds, rss = run_measured(command)
            rows.append(
                {"code": label, "graph": name, "path": out, "export_s": seconds, "rss": rss}
            )
    prompt = [(i * 37) % 4000 + 100 for i in range(args.prompt_len)]
    timings: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(rows))}
    for _ in range(args.rounds):
        for i, row in enumerate(rows):
            timings[i].append(time_graph(row["path"], prompt, args.new_tokens, "auto"))
    print(
        f"SmolLM2-135M, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'graph':<16}{'code':<8}{'prefill tok/s':>14}{'decode tok/s':>14}"
        f"{'export s':>10}{'peak MB':>9}"
    )
    medians = {}
    for i, row in enumerate(rows):
        prefill = statistics.median(t[0] for t in timings[i])
        decode = statistics.median(t[1] for t in timings[i])
        medians[(row["graph"], row["code"])] = (prefill, decode)
        print(
            f"{row['graph']:<16}{row['code']:<8}{prefill:>14.1f}{decode:>14.1f}"
            f"{row['export_s']:>10.1f}{row['rss']:>9.0f}"
        )
    print("after / before:")
    for name in EXPORTS:
        before, after = medians[(name, "before")], medians[(name, "after")]
        print(f"  {name:<16} prefill {after[0] / before[0]:.3f}  decode {after[1] / before[1]:.3f}")


if __name__ == "__main__":
    main()
