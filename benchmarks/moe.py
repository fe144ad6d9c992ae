"""MoE speed on CPU, in one command: a random mixture-of-experts decoder of realistic width
(8 experts, top-2, hidden 1024, expert width 2816, 8 layers; random tensors, no download)
exported ``portable`` and ``ort`` at fp32 and int4 (prefill tok/s of a 256-token prompt,
decode tok/s over 64 tokens, peak RSS), plus the MoE block alone in each expert form at
prefill and decode sizes.

    .venv/bin/python benchmarks/moe.py --rounds 7 --model-rounds 3   # both tables
    .venv/bin/python benchmarks/moe.py --only blocks                  # the expert forms
    .venv/bin/python benchmarks/moe.py --only model --graphs ort-kernel:fp32,ort:fp32

Graph names: ``portable``, ``ort`` (the compiler's measured default), ``ort-kernel`` (MoE /
QMoE wherever they fit: ``moe_kernel="always"``), ``ort-portable-experts`` (``"never"``).
Every graph is exported first (one child each), then timed in interleaved rounds, each run in
a fresh child; the table keeps each graph's best round (the machine may be shared).

Graphs are run straight with onnxruntime (one prefill call on an empty cache, then one call
per generated token with the presents fed back), so the numbers are the graph's, not a
runtime's. ``--ort-version`` is the version the ort graphs are lowered for (QMoE needs 1.32).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KERNEL_GRAPHS = {"ort-kernel": "always", "ort-portable-experts": "never"}
HIDDEN, EXPERT, EXPERTS, TOP_K, LAYERS, HEADS, KV_HEADS, VOCAB = 1024, 2816, 8, 2, 8, 16, 4, 32000


def config(layers: int = LAYERS):
    """The benchmark's ModelConfig (Mixtral-like: softmax top-2 renormalized, SwiGLU experts)."""
    from graphattn.spec import (
        AttentionSpec,
        LayerSpec,
        MlpSpec,
        ModelConfig,
        MoeSpec,
        NormSpec,
        RopeSpec,
    )

    head_dim = HIDDEN // HEADS
    norm = NormSpec("rms", 1e-5)
    rope = RopeSpec(rotary_dim=head_dim, theta=1e6, context=4096)
    moe = MoeSpec(num_experts=EXPERTS, top_k=TOP_K, expert_size=EXPERT, normalize=True)
    layer = LayerSpec(
        AttentionSpec(HEADS, KV_HEADS, head_dim, rope=rope),
        MlpSpec("moe", "silu", EXPERT, moe=moe),
        {"attn_norm": norm, "mlp_norm": norm},
    )
    return ModelConfig("moe_bench", VOCAB, HIDDEN, 4096, (layer,) * layers, norm)


def tensors(cfg, seed: int = 0) -> dict:
    """Random weights by builder role (graph layout [in, out])."""
    import onnx_ir as ir

    rng = np.random.default_rng(seed)

    def mat(*shape, scale=0.02):
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    c, d = HIDDEN, HIDDEN // HEADS
    w = {"embed_tokens": mat(VOCAB, c), "lm_head.weight": mat(VOCAB, c)}  # [V, C]
    w["final_norm.weight"] = np.ones(c, np.float32)
    for i in range(len(cfg.layers)):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = w[p + "mlp_norm.weight"] = np.ones(c, np.float32)
        w[p + "q.weight"], w[p + "o.weight"] = mat(c, HEADS * d), mat(HEADS * d, c)
        w[p + "k.weight"], w[p + "v.weight"] = mat(c, KV_HEADS * d), mat(c, KV_HEADS * d)
        w[p + "mlp.router.weight"] = mat(c, EXPERTS, scale=0.5)
        for e in range(EXPERTS):
            m = f"{p}mlp.experts.{e}."
            w[m + "gate_weight"], w[m + "up_weight"] = mat(c, EXPERT), mat(c, EXPERT)
            w[m + "down_weight"] = mat(EXPERT, c)
    return {name: ir.tensor(a, name=name) for name, a in w.items()}


def export(path: Path, target: str, precision: str, ort_version: str, kernel: str) -> None:
    """Build and compile the benchmark decoder into ``path`` (model.onnx + data)."""
    import onnx_ir as ir

    from graphattn.builder import build_decoder
    from graphattn.compiler import CompileOptions, compile_model

    cfg = config()
    model = build_decoder(cfg, tensors(cfg), last_logits_only=True)
    compile_model(
        model,
        CompileOptions(
            target=target, precision=precision, ort_version=ort_version, moe_kernel=kernel
        ),
    )
    path.mkdir(parents=True, exist_ok=True)
    ir.save(model, path / "model.onnx", external_data="model.onnx.data")


def time_decoder(path: Path, prompt_len: int, new_tokens: int) -> dict:
    """Prefill and decode tok/s of one exported graph (this process)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    ids = np.arange(prompt_len, dtype=np.int64)[None] * 37 % VOCAB
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(prompt_len, dtype=np.int64)[None],
    }
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    pasts = [n for n in inputs if n.startswith("past_key_values.")]
    for name in pasts:
        dims = [
            1 if d == "batch_size" else 0 if isinstance(d, str) else d for d in inputs[name].shape
        ]
        feeds[name] = np.zeros(dims, np.float32)
    outputs = [o.name for o in session.get_outputs()]
    started = time.perf_counter()
    result = dict(zip(outputs, session.run(outputs, feeds)))
    prefill = prompt_len / (time.perf_counter() - started)
    total = prompt_len
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = np.array([[int(result["logits"][0, -1].argmax())]], np.int64)
        total += 1
        step = {
            "input_ids": token,
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.array([[total - 1]], np.int64),
        }
        step = {k: v for k, v in step.items() if k in inputs}
        for name in pasts:
            step[name] = result[name.replace("past_key_values.", "present.")]
        result = dict(zip(outputs, session.run(outputs, step)))
    decode = new_tokens / (time.perf_counter() - started)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


def worker(args) -> None:
    """Export one graph into ``args.out``; report the export's peak RSS (JSON)."""
    export(Path(args.out), args.target, args.precision, args.ort_version, args.moe_kernel)
    print(json.dumps({"export_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``: belongs to the address space, so unlike
    ``ru_maxrss`` it does not inherit the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timer(args) -> None:
    result = time_decoder(Path(args.time), args.prompt_len, args.new_tokens)
    result["rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def block_table(rounds: int) -> list[str]:
    """The MoE block alone (one layer's width), each expert form and the ort kernel, at
    prefill (256 tokens) and decode (1 and 4 tokens): best ms per call over ``rounds``
    interleaved rounds (the machine is shared: the minimum is the least disturbed)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from graphattn.compiler.moe import lower_moe_blocks
    from graphattn.compiler.portable import lower_portable
    from graphattn.compiler.quantize import quantize_weights
    from graphattn.ops import GraphEmitter
    from graphattn.ops.moe import moe_block

    rng = np.random.default_rng(0)
    weights = {"router.weight": 0.5 * rng.standard_normal((HIDDEN, EXPERTS), dtype=np.float32)}
    for e in range(EXPERTS):
        for part, shape in (
            ("gate", (HIDDEN, EXPERT)),
            ("up", (HIDDEN, EXPERT)),
            ("down", (EXPERT, HIDDEN)),
        ):
            weights[f"experts.{e}.{part}_weight"] = 0.02 * rng.standard_normal(
                shape, dtype=np.float32
            )

    def graph(form: str, kernel: bool, bits: int | None):
        from graphattn.compiler.pack import pack_matmuls
        from graphattn.compiler.pipeline import optimize

        g = GraphEmitter("moe_block")
        x = g.input("x", ir.DataType.FLOAT, ["N", HIDDEN])
        values = {k: g.initializer(k, ir.tensor(v, name=k)) for k, v in weights.items()}
        y = moe_block(
            g,
            x,
            values,
            num_experts=EXPERTS,
            top_k=TOP_K,
            normalize=True,
            form=form,
            name="layers.0/mlp",
        )
        g.output(y, "y", ir.DataType.FLOAT)
        model = g.model()
        lower_moe_blocks(
            model,
            target="ort" if kernel else "portable",
            bits=bits,
            ort_version="1.32",
            float_kernel=kernel,
        )
        lower_portable(model)
        optimize(model)
        pack_matmuls(model.graph)
        if bits:
            quantize_weights(
                model,
                bits=bits,
                block_size=32,
                standard=False,
                quantize_lm_head=False,
                accuracy_level=4,
            )
        proto = ir.serde.serialize_model(model)
        return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    sizes = (1, 4, 256)
    variants = (
        ("routed (portable) fp32", "routed", False, None),
        ("dense (portable) fp32", "dense", False, None),
        ("com.microsoft MoE fp32", "routed", True, None),
        ("routed (MatMulNBits) int4", "routed", False, 4),
        ("dense (MatMulNBits) int4", "dense", False, 4),
        ("com.microsoft QMoE int4", "routed", True, 4),
    )
    sessions = [graph(form, kernel, bits) for _, form, kernel, bits in variants]
    best = {(v, n): float("inf") for v in range(len(variants)) for n in sizes}
    for _ in range(rounds):  # interleaved, fresh tokens each round, best of rounds
        for n in sizes:
            x = rng.standard_normal((n, HIDDEN), dtype=np.float32)
            for v, session in enumerate(sessions):
                session.run(None, {"x": x})  # warm (first run of this shape)
                started = time.perf_counter()
                session.run(None, {"x": rng.standard_normal((n, HIDDEN), dtype=np.float32)})
                best[v, n] = min(best[v, n], time.perf_counter() - started)
    lines = ["| expert computation | " + " | ".join(f"{n} tok (ms)" for n in sizes) + " |"]
    lines.append("|---" * (len(sizes) + 1) + "|")
    for v, (label, *_) in enumerate(variants):
        cells = [f"{1000 * best[v, n]:.2f}" for n in sizes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _child(*arguments: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *arguments], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_table(args) -> list[str]:
    """Export every graph (one child each), then time them in interleaved rounds, each run in
    a fresh child (its own peak RSS); best tok/s of the rounds (the machine is shared)."""
    graphs = [g.split(":") for g in args.graphs.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as work:
        for target, precision in graphs:
            path = Path(work) / f"{target}-{precision}"
            kernel = KERNEL_GRAPHS.get(target, "measured")
            flags = ["--target", target.split("-")[0], "--precision", precision]
            flags += ["--moe-kernel", kernel]
            _child("--worker", "--out", str(path), *flags, "--ort-version", args.ort_version)
            results[target, precision] = []
        for _ in range(args.model_rounds):
            for target, precision in graphs:
                path = Path(work) / f"{target}-{precision}"
                run = _child(
                    "--time",
                    str(path),
                    "--prompt-len",
                    str(args.prompt_len),
                    "--new-tokens",
                    str(args.new_tokens),
                )
                results[target, precision].append(run)
                print(target, precision, run, file=sys.stderr)
    best = {
        key: {
            "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
            "decode_tok_s": max(r["decode_tok_s"] for r in runs),
            "rss_mb": max(r["rss_mb"] for r in runs),
        }
        for key, runs in results.items()
    }
    base = best[tuple(graphs[0])]
    lines = [
        f"| graph | prefill tok/s ({args.prompt_len}) | decode tok/s ({args.new_tokens})"
        " | peak RSS MB | prefill × | decode × | RSS × |",
        "|---|---|---|---|---|---|---|",
    ]
    for (target, precision), r in best.items():
        lines.append(
            f"| {target} {precision} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} |"
            f" {r['rss_mb']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} |"
            f" {r['decode_tok_s'] / base['decode_tok_s']:.2f} |"
            f" {r['rss_mb'] / base['rss_mb']:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("blocks", "model"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ort-version", default="1.32")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--moe-kernel", default="measured", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model-rounds", type=int, default=3)
    parser.add_argument(
        "--graphs",
        default="portable:fp32,ort-kernel:fp32,ort-portable-experts:fp32,portable:int4,"
        "ort-kernel:int4,ort-portable-experts:int4",
        help="target:precision list (ort-kernel: MoE/QMoE wherever they fit;"
        " ort-portable-experts: never; ort: the measured default)",
    )
    args = parser.parse_args()
    if args.time:
        return timer(args)
    if args.worker:
        return worker(args)
    print(
        f"onnxruntime CPU, {os.cpu_count()} cores; {EXPERTS} experts top-{TOP_K},"
        f" hidden {HIDDEN}, expert {EXPERT}"
    )
    if args.only in (None, "blocks"):
        print("\n".join(block_table(args.rounds)))
    if args.only in (None, "model"):
        print("\n".join(model_table(args)))


if __name__ == "__main__":
    main()
