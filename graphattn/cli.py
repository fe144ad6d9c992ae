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


@subcommand
def _export_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint (HF directory) to model.onnx + genai_config.json"
    )
    parser.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--progress", action="store_true", help="progress bar even when not a TTY")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from graphattn.exporters.export import export, stderr_progress

    result = export(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
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
    return 0


@subcommand
def _inspect_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect", help="print an export's architecture, I/O, op counts and sizes"
    )
    parser.add_argument("export_dir", help="directory written by graphattn export")
    parser.set_defaults(run=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from graphattn.inspect import describe

    print(describe(args.export_dir))
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
