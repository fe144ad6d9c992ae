"""Prefill and decode tokens/s of SmolLM2-135M exports in our Python runtime, in the Node app
(onnxruntime-node 1.30.0) and in the web page (onnxruntime-web 1.30.0, WASM, headless
Chromium), on the same export, prompt and token count. Prints one markdown table.

    .venv/bin/python benchmarks/js_speed.py [--exports portable-fp32,ort-fp32,ort-int4,...]
        [--prompt-len 128] [--new-tokens 64] [--repeats 1] [--work out/js_speed]
        [--engines python,node,browser]

Exports missing from --work are made with ``graphattn export smollm2-135m`` (the GGUF is
fetched once into the cache). The prompt is the one ``graphattn bench`` uses (128 random
ids, seed 0); every engine decodes greedily without stopping at EOS, --repeats + 1 times in
one process (the first run warms up), and keeps its fastest decode. Python is timed with the
default cache (``auto``) and with ``plain`` (session.run with arrays fed back, the loop the
JS apps use).
Needs ``bash scripts/setup_js.sh`` first for the Node and browser columns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import js_apps  # noqa: E402

from graphattn.runtime.bench import bench_prompt  # noqa: E402

EXPORTS = {
    "portable-fp32": ["--target", "portable"],
    "ort-fp32": ["--target", "ort"],
    "ort-int4": ["--target", "ort", "--precision", "int4"],
    "ort-int4-requantized": ["--target", "ort", "--precision", "int4", "--requantize"],
    "ort-int4-dequantize-at-load": [
        "--target",
        "ort",
        "--precision",
        "int4",
        "--dequantize-at-load",
    ],
}
GRAPHATTN = [sys.executable, "-m", "graphattn.cli"]


def make_export(name: str, work: Path) -> Path:
    out = work / name
    if not (out / "model.onnx").is_file():
        command = [*graphattn(), "export", "smollm2-135m", "-o", str(out), *EXPORTS[name]]
        subprocess.run([*command, "--quiet"], check=True)
    return out


def graphattn() -> list[str]:
    script = Path(sys.executable).with_name("graphattn")
    return [str(script)] if script.is_file() else GRAPHATTN


def prompt_ids(export: Path, length: int) -> list[int]:
    """The prompt ``graphattn bench`` times (:func:`graphattn.runtime.bench.bench_prompt`)."""
    vocab = json.loads((export / "genai_config.json").read_text())["model"]["vocab_size"]
    return bench_prompt(vocab, length)


def python_rows(export: Path, args) -> dict[str, dict]:
    command = [
        *graphattn(),
        "bench",
        str(export),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--provider",
        "cpu",
        "--json",
    ]
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    by_cache = {row["cache"]: row for row in rows}
    auto = "shared" if "shared" in by_cache else "bound"
    pick = {f"python ({auto})": by_cache[auto], "python (plain)": by_cache["plain"]}
    return {
        k: {"prefill": v["prefill_tok_s"], "decode": v["decode_tok_s"]} for k, v in pick.items()
    }


def node_row(export: Path, ids: list[int], args) -> dict:
    report = js_apps.run_node(
        export,
        "--ids",
        json.dumps(ids),
        "--max-new-tokens",
        args.new_tokens,
        "--no-eos",
        "--repeat",
        args.repeats + 1,
        timeout=3600,
    )
    return {"prefill": report["prefillTokS"], "decode": report["decodeTokS"]}


def browser_row(export: Path, ids: list[int], args) -> dict:
    with js_apps.serve(export) as base, tempfile.TemporaryDirectory() as tmp:
        url = js_apps.page_url(base, ids=ids, max=args.new_tokens, noeos=1, repeat=args.repeats + 1)
        result = js_apps.drive(url, Path(tmp), timeout=3600)
    if "error" in result:
        raise RuntimeError(f"{export}: the page failed: {result['error']}")
    threads = f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}"
    return {"prefill": result["prefillTokS"], "decode": result["decodeTokS"], "note": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exports", default=",".join(EXPORTS))
    parser.add_argument("--engines", default="python,node,browser")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per engine (best kept)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "js_speed")
    args = parser.parse_args()
    engines = args.engines.split(",")
    for engine, missing in (
        ("node", js_apps.node_missing()),
        ("browser", js_apps.browser_missing()),
    ):
        if engine in engines and missing:
            parser.error(f"{engine}: {missing}")
    args.work.mkdir(parents=True, exist_ok=True)
    table = []
    for name in args.exports.split(","):
        export = make_export(name, args.work)
        ids = prompt_ids(export, args.prompt_len)
        rows = {}
        if "python" in engines:
            rows.update(python_rows(export, args))
        if "node" in engines:
            rows["node (onnxruntime-node)"] = node_row(export, ids, args)
        if "browser" in engines:
            rows["browser (onnxruntime-web WASM)"] = browser_row(export, ids, args)
        for engine, row in rows.items():
            table.append((name, engine, row))
            print(
                f"{name:22} {engine:32} {row['prefill']:8.1f} {row['decode']:7.1f}", file=sys.stderr
            )
    load = os.getloadavg()[0]
    print(
        f"\nSmolLM2-135M, prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy,"
        f" {os.cpu_count()} CPUs (load average {load:.1f} at the end)\n"
    )
    print("| export | engine | prefill tok/s | decode tok/s | note |")
    print("|---|---|---|---|---|")
    for name, engine, row in table:
        print(
            f"| {name} | {engine} | {row['prefill']:.1f} | {row['decode']:.1f}"
            f" | {row.get('note', '')} |"
        )


if __name__ == "__main__":
    main()
