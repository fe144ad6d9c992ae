"""Export time and peak resident memory for GPT-2-124M-sized and Llama-135M-sized random
checkpoints, as ratios to the checkpoint's bytes on disk.

    .venv/bin/python benchmarks/export.py [--models gpt2,llama] [--keep DIR]

Each checkpoint is written by a separate process, then exported by a fresh process that runs
``graphattn export`` and reports its own peak RSS (ru_maxrss) when done. The time includes
that process's start-up and imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "gpt2": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": 50257,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def write_checkpoint(name: str, directory: Path) -> None:
    """Runs in a child process: random weights via the tests' independent writer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import checkpoints  # noqa: PLC0415

    config = CONFIGS[name]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = checkpoints.weight_shapes(config)
    weights = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in shapes.items()}
    checkpoints.write_safetensors(directory / "model.safetensors", weights)


def measure(name: str, work: Path) -> dict:
    checkpoint = work / f"{name}-hf"
    subprocess.run([sys.executable, __file__, "--write", name, str(checkpoint)], check=True)
    size = (checkpoint / "model.safetensors").stat().st_size
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--export", str(checkpoint), str(work / name)],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return {
        "model": name,
        "checkpoint_mb": size / 2**20,
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "rss_ratio": peak / size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--write", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.write:
        write_checkpoint(args.write[0], Path(args.write[1]))
        return
    if args.export:  # child: export, then report this process's own peak RSS
        from graphattn.cli import main as cli_main  # noqa: PLC0415

        status = cli_main(["export", args.export[0], "-o", args.export[1], "--quiet"])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"peak_rss_bytes": peak}))
        sys.exit(status)
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphattn-bench-") as work:
        for name in args.models.split(","):
            rows.append(measure(name, Path(work)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<8}{'checkpoint':>12}{'export s':>10}{'peak RSS':>11}{'RSS/ckpt':>10}")
    for r in rows:
        print(
            f"{r['model']:<8}{r['checkpoint_mb']:>9.0f} MB{r['seconds']:>10.1f}"
            f"{r['peak_rss_mb']:>8.0f} MB{r['rss_ratio']:>10.2f}"
        )


if __name__ == "__main__":
    main()
