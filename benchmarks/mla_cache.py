"""KV-cache bytes per token of multi-head latent attention (MLA) exports against the same
model with expanded K/V, for DeepSeek-V3 and DeepSeek-V2-Lite shapes.

    .venv/bin/python benchmarks/mla_cache.py [--tokens 16] [--speed] [--past 2048]

For each model, the published ``config.json`` sizes go through ``models/deepseek.py`` with
one layer, a tiny hidden size and vocabulary, dense MLP and no low-rank query (none of which
changes the cache; the attention shapes ``num_attention_heads``, ``kv_lora_rank``,
``qk_rope_head_dim``, ``qk_nope_head_dim``, ``v_head_dim`` are the published ones). Random
weights of the plan's shapes are built into a graph, compiled (portable, fp32 and fp16) and
run on a prefill of ``--tokens`` tokens; the cache bytes per token per layer are the
``present.0.*`` arrays' bytes divided by the tokens, read from the run. The expanded
comparison is what an exporter caching per-head K ``[H, qk_nope + qk_rope]`` and V ``[H,
v_head_dim]`` would hold: ``H · (qk_head_dim + v_head_dim)`` values. Whole model: per layer
× ``num_hidden_layers``.

``--speed``: median step time (portable fp32, onnxruntime CPU) of the one-layer graph at
decode (1 token after a past of ``--past`` positions) and prefill (``--past`` tokens, no past)
in four builds: the default (an ``If`` on the call's length: at least
``ops.mla.expand_threshold`` tokens expanded, else absorbed), absorbed only as grouped
MatMuls, absorbed only as opset-23 ``Attention``
(``graphattn.compiler.latent.ABSORBED_TO_ATTENTION``), and expanded only (K/V rebuilt from
the whole cached latent at every call, as Attention). Rounds alternate between them so that
machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphattn.builder import build_decoder
from graphattn.compiler import CompileOptions, compile_model
from graphattn.models import architecture_for

ATTENTION_KEYS = {  # the published checkpoints' attention sizes
    "DeepSeek-V3": dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        num_hidden_layers=61,
        num_attention_heads=128,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    ),
    "DeepSeek-V2-Lite": dict(
        model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
        num_hidden_layers=27,
        num_attention_heads=16,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    ),
}
TINY = dict(
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=16,
    vocab_size=64,
    n_routed_experts=2,
    num_experts_per_tok=1,
    n_shared_experts=1,
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    q_lora_rank=None,
)


def tiny_config(name: str, form: str = "absorbed"):
    """(one-layer ModelConfig with the published attention sizes, its weight plan)."""
    published = ATTENTION_KEYS[name]
    config = {**TINY, **published, "num_hidden_layers": 1, "first_k_dense_replace": 1}
    architecture = architecture_for(config)
    cfg = architecture.config_from_hf(config)
    if form != "absorbed":
        import dataclasses

        latent = dataclasses.replace(cfg.layers[0].attention.latent, form=form)
        cfg = cfg.replace_attention(latent=latent)
    return cfg, architecture.weights(cfg)


def session(
    name: str, dtype: str, form: str = "absorbed", to_attention: bool = False, hybrid: bool = True
) -> ort.InferenceSession:
    import graphattn.layers
    from graphattn.compiler import latent

    cfg, plan = tiny_config(name, form)
    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    tensors = {
        role: ir.tensor(
            (0.05 * rng.standard_normal(source.graph_shape)).astype(np_dtype), name=source.name
        )
        for role, source in plan.items()
    }
    ir_dtype = ir.DataType.FLOAT16 if dtype == "fp16" else ir.DataType.FLOAT
    threshold = graphattn.layers.expand_threshold
    if not hybrid:
        graphattn.layers.expand_threshold = lambda *_: 0
    try:
        model = build_decoder(cfg, tensors, dtype=ir_dtype, last_logits_only=True)
    finally:
        graphattn.layers.expand_threshold = threshold
    latent.ABSORBED_TO_ATTENTION = to_attention
    try:
        compile_model(model, CompileOptions(target="portable", precision=dtype))
    finally:
        latent.ABSORBED_TO_ATTENTION = False
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, tokens: int, past: int, np_dtype) -> dict:
    out = {"input_ids": np.full((1, tokens), 3, np.int64)}
    out["attention_mask"] = np.ones((1, past + tokens), np.int64)
    out["position_ids"] = np.arange(past, past + tokens, dtype=np.int64)[None]
    rng = np.random.default_rng(1)
    for value in sess.get_inputs():
        if value.name.startswith("past_key_values."):
            shape = [
                1 if d == "batch_size" else past if isinstance(d, str) else d for d in value.shape
            ]
            out[value.name] = rng.standard_normal(shape).astype(np_dtype)
    return {k: v for k, v in out.items() if k in {i.name for i in sess.get_inputs()}}


def cache_bytes(name: str, dtype: str, tokens: int) -> tuple[dict[str, list], int]:
    """{present name: shape} and the cache bytes per token per layer of a prefill run."""
    sess = session(name, dtype)
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(names, feeds(sess, tokens, 0, np_dtype))))
    presents = {n: list(v.shape) for n, v in outputs.items() if n.startswith("present.")}
    total = sum(v.nbytes for n, v in outputs.items() if n.startswith("present."))
    return presents, total // tokens


VARIANTS = {  # label: (form, absorbed MQA to Attention, If expanding long calls)
    "default: If(S ≥ threshold) expanded, else absorbed (MatMuls)": ("absorbed", False, True),
    "absorbed only, grouped MatMuls": ("absorbed", False, False),
    "absorbed only, Attention": ("absorbed", True, False),
    "expanded only, Attention": ("expanded", False, False),
}


def step_ms(name: str, past: int, rounds: int = 7) -> dict[tuple[str, str], float]:
    """Median ms per call of each variant at decode and at prefill."""
    sessions = {label: session(name, "fp32", *v) for label, v in VARIANTS.items()}
    calls = {}
    for label, sess in sessions.items():
        calls[(label, "decode")] = (sess, feeds(sess, 1, past, np.float32))
        calls[(label, "prefill")] = (sess, feeds(sess, past, 0, np.float32))
    times = {key: [] for key in calls}
    for sess, fed in calls.values():
        sess.run(None, fed)
    for _ in range(rounds):
        for key, (sess, fed) in calls.items():
            start = time.perf_counter()
            sess.run(None, fed)
            times[key].append(time.perf_counter() - start)
    return {key: 1000 * statistics.median(t) for key, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--past", type=int, default=2048)
    args = parser.parse_args()
    rows = []
    for name, keys in ATTENTION_KEYS.items():
        heads, layers = keys["num_attention_heads"], keys["num_hidden_layers"]
        expanded = heads * (
            keys["qk_nope_head_dim"] + keys["qk_rope_head_dim"] + keys["v_head_dim"]
        )
        for dtype in ("fp16", "fp32"):
            presents, per_layer = cache_bytes(name, dtype, args.tokens)
            width = 2 if dtype == "fp16" else 4
            values = per_layer // width
            shapes = ", ".join(f"{n.split('.')[-1]} {s}" for n, s in presents.items())
            rows.append(
                (
                    name,
                    dtype,
                    shapes,
                    values,
                    per_layer,
                    per_layer * layers,
                    expanded,
                    layers,
                    width,
                )
            )
    print(f"prefill of {args.tokens} tokens, batch 1; present shapes from the run\n")
    header = (
        "| model | dtype | cached per layer (run) | values/token/layer MLA | expanded K/V |"
        " bytes/token/layer MLA | expanded | whole model MLA | expanded | ratio |"
    )
    print(header)
    print("|" + "---|" * 10)
    for name, dtype, shapes, values, per_layer, whole, expanded, layers, width in rows:
        print(
            f"| {name} ({layers} layers) | {dtype} | {shapes} | {values} | {expanded} |"
            f" {per_layer:,} | {expanded * width:,} | {whole / 1024:,.1f} KiB |"
            f" {expanded * width * layers / 2**20:,.2f} MiB | {expanded / values:.1f}× |"
        )
    if args.speed:
        print(
            f"\nms per call, 1 layer, portable fp32, onnxruntime CPU (median of rounds):"
            f" decode = 1 token after {args.past}, prefill = {args.past} tokens"
        )
        print("| model | lowering | decode ms | prefill ms |")
        print("|---|---|---|---|")
        for name in ATTENTION_KEYS:
            ms = step_ms(name, args.past)
            for label in VARIANTS:
                decode, prefill = ms[(label, "decode")], ms[(label, "prefill")]
                print(f"| {name} | {label} | {decode:.1f} | {prefill:.1f} |")


if __name__ == "__main__":
    main()
