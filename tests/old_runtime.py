"""The second venv, ``.venv-ort130`` (``scripts/setup_ort130.sh``): graphattn with onnxruntime
1.30.0, the newest on npm, for tests of what an older onnxruntime does with our exports."""

import subprocess
from pathlib import Path

import pytest

OLD_PYTHON = Path(__file__).resolve().parents[1] / ".venv-ort130" / "bin" / "python"
needs_old_venv = pytest.mark.skipif(
    not OLD_PYTHON.is_file(), reason="no .venv-ort130 (scripts/setup_ort130.sh creates it)"
)


def refusal_line(export_dir: Path) -> str:
    """``graphattn generate`` on ``export_dir`` under onnxruntime 1.30 must exit 1 with one
    line on stderr and no traceback; returns that line."""
    done = subprocess.run(
        [str(OLD_PYTHON.parent / "graphattn"), "generate", str(export_dir), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]
