"""Export time and peak resident memory for random checkpoints, as ratios to the
checkpoint's bytes on disk, and against ONNX Runtime GenAI's builder on the same directory.

    .venv/bin/python benchmarks/export.py [--models gpt2,llama,qwen3,gemma2] [--genai]

``gpt2`` / ``llama``: GPT-2-124M and Llama-135M shapes in float32. ``qwen3``: a Qwen3-0.6B
shape, ``gemma2``: a Gemma-2-2B shape cut to 6 layers, both bfloat16 as published (written
through transformers on the meta device, so the names are exactly save_pretrained's). Each
checkpoint is written by a separate process, then exported by a fresh process that runs
``graphattn export`` and reports its own peak RSS (ru_maxrss) when done; with ``--genai`` the
GenAI builder (``-p fp32 -e cpu``) runs on the same directory in its own process, measured by
``os.wait4``. The times include start-up and imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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


# Published shapes (HF config.json keys), weights random bfloat16.
BF16_CONFIGS = {
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "gemma2": {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 6,  # of 26
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "torch_dtype": "bfloat16",
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}


def write_bf16_checkpoint(name: str, directory: Path) -> None:
    """Runs in a child process: names and shapes from transformers on the meta device, then
    random bfloat16 tensors written one shard at a time."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.for_model(**BF16_CONFIGS[name])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        n: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
        for n, p in model.state_dict().items()
        if not (config.tie_word_embeddings and n == "lm_head.weight")
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def write_checkpoint(name: str, directory: Path) -> None:
    """Runs in a child process: random weights via the tests' independent writer."""
    if name in BF16_CONFIGS:
        write_bf16_checkpoint(name, directory)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import checkpoints  # noqa: PLC0415

    config = CONFIGS[name]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = checkpoints.weight_shapes(config)
    weights = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in shapes.items()}
    checkpoints.write_safetensors(directory / "model.safetensors", weights)


def measure_genai(checkpoint: Path, out: Path) -> dict:
    """GenAI's builder on the same directory (its own process, wait4's peak RSS)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from compare import run_measured  # noqa: PLC0415

    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint)]
    command += ["-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    seconds, peak_mb = run_measured(command)
    return {"genai_seconds": seconds, "genai_peak_rss_mb": peak_mb}


def measure(name: str, work: Path, genai: bool = False) -> dict:
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
    row = {
        "model": name,
        "checkpoint_mb": size / 2**20,
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "rss_ratio": peak / size,
    }
    if genai:
        row |= measure_genai(checkpoint, work / f"{name}-genai")
    shutil.rmtree(work / name, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--write", nargs=2, metavar=("NAME", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--genai", action="store_true", help="also time GenAI's builder")
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
            rows.append(measure(name, Path(work), args.genai))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = f"{'model':<8}{'checkpoint':>12}{'export s':>10}{'peak RSS':>11}{'RSS/ckpt':>10}"
    print(header + ("  GenAI s  GenAI RSS  time ratio  RSS ratio" if args.genai else ""))
    for r in rows:
        line = (
            f"{r['model']:<8}{r['checkpoint_mb']:>9.0f} MB{r['seconds']:>10.1f}"
            f"{r['peak_rss_mb']:>8.0f} MB{r['rss_ratio']:>10.2f}"
        )
        if "genai_seconds" in r:
            line += (
                f"{r['genai_seconds']:>9.1f}{r['genai_peak_rss_mb']:>8.0f} MB"
                f"{r['seconds'] / r['genai_seconds']:>12.2f}"
                f"{r['peak_rss_mb'] / r['genai_peak_rss_mb']:>11.2f}"
            )
        print(line)


if __name__ == "__main__":
    main()
