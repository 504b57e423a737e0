"""frontend-patch/apply.py: the installed TorchServe frontend carries the kit's patch, applying it again
changes nothing, and a jar it was not written for is refused with one line and left as it was. What
the patch does to requests is tested against a real TorchServe (tests/integration/test_reliability.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import pytest
from helpers import ROOT, assert_one_line_error

APPLY = ROOT / "frontend-patch" / "apply.py"
SOURCE = ROOT / "frontend-patch" / "InferenceRequestHandler.java"
MARKER = "META-INF/image-classifier-kit/frontend-patch.sha256"


def apply(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(APPLY), *args], capture_output=True, text=True, timeout=120)


def installed_jar():
    import ts

    return ts.__path__[0] + "/frontend/model-server.jar"


def test_the_installed_frontend_carries_this_version_of_the_patch():
    with zipfile.ZipFile(installed_jar()) as jar:
        assert MARKER in jar.namelist(), "TorchServe's frontend is not patched: run make java"
        assert jar.read(MARKER).decode().strip() == hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def test_applying_it_again_changes_nothing():
    with open(installed_jar(), "rb") as jar:
        before = hashlib.sha256(jar.read()).hexdigest()
    result = apply()
    assert result.returncode == 0 and "already patched" in result.stdout, result.stderr
    with open(installed_jar(), "rb") as jar:
        assert hashlib.sha256(jar.read()).hexdigest() == before


def write_jar(path, entries: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as jar:
        for name, data in entries.items():
            jar.writestr(name, data)
    return path.read_bytes()


@pytest.mark.parametrize("entries, message", [
    ({"META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n"}, "is not TorchServe 0.12.0's frontend"),
    ({MARKER: b"0" * 64 + b"\n"}, "pip install --force-reinstall --no-deps torchserve==0.12.0"),
], ids=["another version", "another patch"])
def test_a_jar_it_was_not_written_for_is_refused_and_left_as_it_was(tmp_path, entries, message):
    jar = tmp_path / "model-server.jar"
    before = write_jar(jar, entries)
    assert_one_line_error(apply("--jar", str(jar)), message)
    assert jar.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model-server.jar"]


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"not a zip", "is not a jar")])
def test_a_missing_or_broken_jar_is_one_line(tmp_path, content, message):
    jar = tmp_path / "model-server.jar"
    if content is not None:
        jar.write_bytes(content)
    assert_one_line_error(apply("--jar", str(jar)), message)
