"""Per-step (decode) attention cost of native sparse attention and sparse routed attention
against dense attention, lowered to ``portable`` (standard ONNX ops) and run in onnxruntime CPU.

    .venv/bin/python benchmarks/sparse_attention.py [--contexts 1024 4096 16384]
        [--runs 30] [--rounds 3] [--threads 1] [--json out.json]

One query (S = 1, batch 1) against a cache of ``context - 1`` keys plus its own: 8 query
heads, 2 KV heads, head_dim 64, fp32. Dense is ``scaled_dot_product_attention`` (lowered to
opset-23 ``Attention``); NSA uses blocks of 64, top-16 blocks, top-256 tokens and a window of
512; routed attention segments of 64 and top-16 segments (both attend about 1k keys); each
with a selection per query head and per KV head (``group``: the 4 query heads of a KV head
share it). NSA's three paths (per-head selection) are also timed alone, to show where its
step goes. Each figure is the median of ``--runs`` calls (``--fastest``: the fastest call);
rounds interleave the graphs so machine noise hits them alike, and the table keeps each
graph's best round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphattn import ops
from graphattn.compiler import CompileOptions, compile_model
from graphattn.ops import GraphEmitter
from graphattn.ops.sparse_attention import (
    NsaCoarse,
    NsaFine,
    NsaWindow,
    native_sparse_attention,
    sparse_routed_attention,
)

HEADS, KV_HEADS, DIM = 8, 2, 64
NSA = {"block_size": 64, "top_blocks": 16, "top_tokens": 256, "window": 512}
ROUTED = {"segment_size": 64, "top_k": 16}
FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64


def _inputs(g: GraphEmitter) -> dict[str, ir.Value]:
    return {
        "query": g.input("query", FLOAT, [1, HEADS, 1, DIM]),
        "key": g.input("key", FLOAT, [1, KV_HEADS, 1, DIM]),
        "value": g.input("value", FLOAT, [1, KV_HEADS, 1, DIM]),
        "past_key": g.input("past_key", FLOAT, [1, KV_HEADS, "past", DIM]),
        "past_value": g.input("past_value", FLOAT, [1, KV_HEADS, "past", DIM]),
        "attention_mask": g.input("attention_mask", INT64, [1, "total"]),
    }


def build(kind: str) -> bytes:
    """The portable model of one decode step of ``kind``."""
    g = GraphEmitter(kind)
    x = _inputs(g)
    past = {"past_key_BKPD": x["past_key"], "past_value_BKPD": x["past_value"]}
    common = {"num_heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM}
    if kind == "dense":
        ids = g.input("input_ids", INT64, [1, 1])
        bias = ops.attention_bias(g, x["attention_mask"], ids, causal=True)
        out, _, _ = ops.scaled_dot_product_attention(
            g, x["query"], x["key"], x["value"], mask=bias, **common, **past
        )
    elif kind in ("nsa", "nsa group"):
        gate = g.initializer("gate", np.zeros(HEADS, dtype=np.float32))
        out, _, _ = native_sparse_attention(
            g,
            x["query"],
            x["key"],
            x["value"],
            gate_coarse=gate,
            gate_fine=gate,
            gate_window=gate,
            attention_mask_BT=x["attention_mask"],
            selection="group" if kind.endswith("group") else "head",
            **common,
            **NSA,
            **past,
        )
    elif kind in ("routed", "routed group"):
        cos = g.input("cos", FLOAT, [1, "total", DIM // 2])
        sin = g.input("sin", FLOAT, [1, "total", DIM // 2])
        out, _, _ = sparse_routed_attention(
            g,
            x["query"],
            x["key"],
            x["value"],
            cos_BTR=cos,
            sin_BTR=sin,
            attention_mask_BT=x["attention_mask"],
            selection="group" if kind.endswith("group") else "head",
            **common,
            **ROUTED,
            **past,
        )
    else:  # one NSA path alone
        key = g.op("Concat", [x["past_key"], x["key"]], {"axis": 2}, name="key_all")
        value = g.op("Concat", [x["past_value"], x["value"]], {"axis": 2}, name="value_all")
        scale = {"scale": DIM**-0.5}
        function, attributes = {
            "nsa coarse": (NsaCoarse, {"block_size": 64, "top_blocks": 16, "shared": 0}),
            "nsa fine": (NsaFine, {"top_tokens": 256, "shared": 0}),
            "nsa window": (NsaWindow, {"window": 512}),
        }[kind]
        out = g.call(
            function,
            [x["query"], key, value, x["attention_mask"]],
            {**attributes, **scale},
            name="path",
        )
    g.output(out, "output", FLOAT, [1, HEADS, 1, DIM])
    model = g.model()
    compile_model(model, CompileOptions("portable"))
    return ir.serde.serialize_model(model).SerializeToString()


def feeds_for(kind: str, context: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {
        "query": rng.standard_normal((1, HEADS, 1, DIM), dtype=np.float32),
        "key": rng.standard_normal((1, KV_HEADS, 1, DIM), dtype=np.float32),
        "value": rng.standard_normal((1, KV_HEADS, 1, DIM), dtype=np.float32),
        "past_key": rng.standard_normal((1, KV_HEADS, context - 1, DIM), dtype=np.float32),
        "past_value": rng.standard_normal((1, KV_HEADS, context - 1, DIM), dtype=np.float32),
        "attention_mask": np.ones((1, context), dtype=np.int64),
    }
    if kind == "dense":
        feeds["input_ids"] = np.zeros((1, 1), dtype=np.int64)
    if kind.startswith("routed"):
        angles = np.arange(context)[:, None] * 10000.0 ** (-np.arange(DIM // 2) / (DIM // 2))
        feeds["cos"] = np.cos(angles)[None].astype(np.float32)
        feeds["sin"] = np.sin(angles)[None].astype(np.float32)
    return feeds


def call_ms(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int
) -> tuple[float, float]:
    """(median, fastest) milliseconds of ``runs`` calls after one warm-up call."""
    session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), 1000 * min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fastest",
        action="store_true",
        help="each figure is the fastest call, not the median (for a machine shared with other"
        " work, whose load inflates medians)",
    )
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)

    kinds = [
        "dense",
        "nsa",
        "nsa group",
        "routed",
        "routed group",
        "nsa coarse",
        "nsa fine",
        "nsa window",
    ]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions = {
        kind: ort.InferenceSession(build(kind), options, providers=["CPUExecutionProvider"])
        for kind in kinds
    }
    rng = np.random.default_rng(0)
    table: dict[int, dict[str, float]] = {}
    for context in args.contexts:
        feeds = {kind: feeds_for(kind, context, rng) for kind in kinds}
        best = {kind: float("inf") for kind in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                median, fastest = call_ms(sessions[kind], feeds[kind], args.runs)
                best[kind] = min(best[kind], fastest if args.fastest else median)
        table[context] = best

    print(f"ms per decode step (batch 1, {HEADS} q / {KV_HEADS} kv heads, head_dim {DIM}, fp32,")
    figure = "fastest call" if args.fastest else "median call"
    print(
        f"portable, onnxruntime {ort.__version__} CPU, {args.threads} thread(s), {figure});"
        " × = vs dense"
    )
    header = "| context | " + " | ".join(kinds) + " |"
    print(header)
    print("|" + "---|" * (len(kinds) + 1))
    for context, row in table.items():
        cells = [f"{row['dense']:.3f}"] + [
            f"{row[k]:.3f} ({row[k] / row['dense']:.2f}×)" for k in kinds[1:]
        ]
        print(f"| {context} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({str(c): row for c, row in table.items()}, handle, indent=1)


if __name__ == "__main__":
    main()
