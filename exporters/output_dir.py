"""Write an export into a temporary directory beside the target; rename into place on success.

A failure removes the temporary directory, so no half-written output is ever left behind. An
existing target is replaced only if it is a previous export (holds ``genai_config.json`` or
``model.onnx``) or empty; anything else is refused.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

EXPORT_MARKERS = ("genai_config.json", "model.onnx")


@contextlib.contextmanager
def staged_directory(
    target: str | Path, markers: tuple[str, ...] = EXPORT_MARKERS
) -> Iterator[Path]:
    """Yields a fresh temporary directory; on normal exit it becomes ``target``.

    An existing non-empty ``target`` is replaced only if it holds one of ``markers``."""
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target}: exists and is not a directory")
        if any(target.iterdir()) and not any((target / m).exists() for m in markers):
            raise FileExistsError(f"{target}: exists and is not a graphattn output; choose another")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    )
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}.{staging.name}.old")
        target.rename(retired)
    staging.rename(target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
