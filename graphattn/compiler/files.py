"""Compile an existing export directory into a new one (``graphattn compile``)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from graphattn.compiler.pipeline import CompileOptions, compile_model
from graphattn.exporters.checkpoint import TOKENIZER_FILES, copy_present
from graphattn.exporters.export import MODEL_FILE, save_model
from graphattn.exporters.genai_config import describe_graph
from graphattn.exporters.output_dir import staged_directory


def compile_export(in_dir: str | Path, out_dir: str | Path, options: CompileOptions) -> Path:
    """Read ``in_dir/model.onnx`` (+ data), compile, write ``out_dir``; returns the model path."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    model_path = in_dir / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{in_dir}: no {MODEL_FILE}")
    if out_dir.absolute() == in_dir.absolute():
        raise ValueError(f"{out_dir}: compile into a different directory than its input")
    model = ir.load(str(model_path))
    previous = model.metadata_props.get("graphattn.target", "functions")
    if previous != "functions":
        raise ValueError(f"{in_dir}: already compiled to {previous!r}; compile a functions export")
    compile_model(model, options)
    with staged_directory(out_dir) as staging:
        save_model(model, staging)
        copy_present(in_dir, staging, TOKENIZER_FILES)
        config_path = in_dir / "genai_config.json"
        if config_path.is_file():
            config = describe_graph(json.loads(config_path.read_text()), model)
            (staging / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir.absolute() / MODEL_FILE
