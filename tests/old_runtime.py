"""The second venv, ``.venv-ort130`` (``scripts/setup_ort130.sh``): graphattn with onnxruntime
1.30.0, the newest on npm, for tests of what an older onnxruntime does with our exports."""

import json
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


_GREEDY = """
import json, sys
import onnxruntime
from graphattn.runtime import Generator
path, prompts, cache, steps = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows = prompts if prompts and isinstance(prompts[0], list) else [prompts]
generator = Generator(path, provider="cpu", cache=cache, max_length=max(map(len, rows)) + steps)
runs = generator.generate(rows, max_new_tokens=steps, use_eos=False)
tokens = [r.token_ids for r in runs]
print(json.dumps({"version": onnxruntime.__version__, "cache": generator.cache.name,
                  "tokens": tokens if rows is prompts else tokens[0]}))
"""


def old_greedy(export_dir: Path, prompts, steps: int, cache: str = "auto"):
    """Greedy tokens of our runtime under onnxruntime 1.30 (one prompt or a list of them):
    the finished process, whose last stdout line is ``{"version", "cache", "tokens"}``."""
    return subprocess.run(
        [str(OLD_PYTHON), "-c", _GREEDY, str(export_dir), json.dumps(prompts), cache, str(steps)],
        capture_output=True,
        text=True,
        timeout=300,
    )
