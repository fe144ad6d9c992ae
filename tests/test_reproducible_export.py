"""The same checkpoint exports to the same bytes, whatever the interpreter's hash seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import checkpoints
import pytest

EXPORT = """
import sys
from graphattn import export
export(sys.argv[1], sys.argv[2], target=sys.argv[3])
"""


@pytest.mark.parametrize("target", ["functions", "ort"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_bytes_do_not_depend_on_hash_seed(family, target, tmp_path: Path):
    config = {"gpt2": checkpoints.GPT2, "llama": checkpoints.LLAMA}[family]
    checkpoints.write_checkpoint(tmp_path / "hf", config, seed=3)
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", EXPORT, str(tmp_path / "hf"), str(out), target],
            check=True,
            env=env,
            capture_output=True,
        )
        outputs.append(out)
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        first, second = (o / name for o in outputs)
        assert first.is_file(), f"{name} was not written"
        assert first.read_bytes() == second.read_bytes(), f"{name} differs between hash seeds"
