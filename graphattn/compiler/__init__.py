"""graphattn.compiler: lower a built model to a target and precision."""

from graphattn.compiler.pipeline import PRECISIONS, TARGETS, CompileOptions, compile_model

__all__ = ["PRECISIONS", "TARGETS", "CompileOptions", "compile_model"]
