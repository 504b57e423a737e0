"""frontend-patch/apply.py: the installed TorchServe frontend carries the kit's patch, applying it again
changes nothing, a stock 0.12.0 jar is patched from the committed class without a compiler (again after
a reinstall), a jar it was not written for is left as it was with one warning, and the committed class
is what javac makes of the source. What the patch does to requests is tested against a real TorchServe
(tests/integration/test_reliability.py)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT, assert_one_line_error

PATCH = ROOT / "frontend-patch"
APPLY = PATCH / "apply.py"
SOURCE = PATCH / "InferenceRequestHandler.java"
CLASSES = PATCH / "classes"
MARKER = "META-INF/image-classifier-kit/frontend-patch.sha256"
STOCK_JAR_SHA256 = "ce340411ce54beaacd3dcfa31644a9aa369a83a36ed687172ba1088a13123dfe"  # torchserve 0.12.0
WHEEL = "torchserve-0.12.0-py3-none-any.whl"
# The patched class and any inner class of it, as the jar names them.
PATCHED_ENTRY = re.compile(r"org/pytorch/serve/http/api/rest/InferenceRequestHandler(\$[\w$]+)?\.class")


def apply(*args: str, apply_py: Path = APPLY, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(apply_py), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def without_javac() -> dict:
    """The environment with a PATH that holds no javac (and no other JDK tool)."""
    return {**os.environ, "PATH": "/nonexistent"}


def installed_jar():
    import ts

    return ts.__path__[0] + "/frontend/model-server.jar"


def committed_classes() -> dict[str, bytes]:
    return {path.relative_to(CLASSES).as_posix(): path.read_bytes() for path in CLASSES.rglob("*.class")}


def patched_entries(jar) -> dict[str, bytes]:
    with zipfile.ZipFile(jar) as archive:
        return {name: archive.read(name) for name in archive.namelist() if PATCHED_ENTRY.fullmatch(name)}


def assert_one_line_warning(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A jar the patch does not know: exit 0, one 'warning:' line naming the problem, nothing else on stderr."""
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("warning: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_the_installed_frontend_carries_this_version_of_the_patch():
    with zipfile.ZipFile(installed_jar()) as jar:
        assert MARKER in jar.namelist(), "TorchServe's frontend is not patched: run make java"
        assert jar.read(MARKER).decode().strip() == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    assert patched_entries(installed_jar()) == committed_classes()


def test_applying_it_again_changes_nothing():
    with open(installed_jar(), "rb") as jar:
        before = hashlib.sha256(jar.read()).hexdigest()
    result = apply()
    assert result.returncode == 0 and "already patched" in result.stdout, result.stderr
    with open(installed_jar(), "rb") as jar:
        assert hashlib.sha256(jar.read()).hexdigest() == before


def test_the_committed_classes_are_built_from_this_source():
    assert committed_classes(), f"{CLASSES} holds no class: python frontend-patch/apply.py --rebuild"
    assert (CLASSES / "built-from.sha256").read_text().strip() == hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def disassembly(class_file: Path) -> str:
    """javap's code listing without constant-pool indices, which differ between javac builds."""
    listing = subprocess.run(["javap", "-c", "-p", str(class_file)], capture_output=True, text=True, check=True)
    return re.sub(r"#\d+(:#\d+)?\s*", "# ", listing.stdout)


@pytest.mark.skipif(shutil.which("javac") is None or shutil.which("javap") is None,
                    reason="no javac/javap (a JDK 17) on PATH: the committed class cannot be rebuilt from "
                           "InferenceRequestHandler.java here to compare")
def test_rebuilding_the_class_from_the_source_gives_the_committed_one(tmp_path):
    copy = tmp_path / "frontend-patch"
    copy.mkdir()
    for name in ("apply.py", SOURCE.name):
        shutil.copy(PATCH / name, copy / name)
    # The installed jar's other classes are the stock ones the source compiles against.
    result = apply("--rebuild", "--jar", installed_jar(), apply_py=copy / "apply.py")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr
    rebuilt = {path.relative_to(copy / "classes").as_posix(): path for path in (copy / "classes").rglob("*.class")}
    assert sorted(rebuilt) == sorted(committed_classes())
    for name, path in rebuilt.items():
        if path.read_bytes() != (CLASSES / name).read_bytes():  # another javac build: compare the code
            assert disassembly(path) == disassembly(CLASSES / name), (
                f"{name} differs from what javac makes of {SOURCE.name}: python frontend-patch/apply.py --rebuild")
    assert (copy / "classes" / "built-from.sha256").read_text() == (CLASSES / "built-from.sha256").read_text()


@pytest.fixture(scope="module")
def stock_jar(pytestconfig, tmp_path_factory) -> Path:
    """TorchServe 0.12.0's own model-server.jar, from its wheel: docker/wheels/ (make docker-offline) or
    one `pip download` into pytest's cache."""
    cache = (pytestconfig.cache.mkdir("torchserve-0.12.0-wheel") if getattr(pytestconfig, "cache", None)
             else tmp_path_factory.mktemp("torchserve-0.12.0-wheel"))  # -p no:cacheprovider
    wheel = next((folder / WHEEL for folder in (ROOT / "docker" / "wheels", cache) if (folder / WHEEL).is_file()),
                 None)
    if wheel is None:
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                   "--only-binary=:all:", "-d", str(cache), "torchserve==0.12.0"],
                                  capture_output=True, text=True, timeout=600)
        if not (cache / WHEEL).is_file():
            reason = (download.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"no {WHEEL} to take a stock jar from (pip download failed: {reason})")
        wheel = cache / WHEEL
    jar = tmp_path_factory.mktemp("stock") / "model-server.jar"
    with zipfile.ZipFile(wheel) as archive:
        jar.write_bytes(archive.read("ts/frontend/model-server.jar"))
    assert hashlib.sha256(jar.read_bytes()).hexdigest() == STOCK_JAR_SHA256
    return jar


@pytest.mark.slow
def test_a_stock_jar_is_patched_without_javac_and_again_after_a_reinstall(tmp_path, stock_jar):
    jar = tmp_path / "model-server.jar"
    for run in ("first install", "reinstalled"):  # a reinstall (pip --force-reinstall) puts the stock jar back
        shutil.copy(stock_jar, jar)
        result = apply("--jar", str(jar), env=without_javac())
        assert result.returncode == 0 and result.stdout.startswith("patched "), (run, result.stderr)
        with zipfile.ZipFile(jar) as archive:
            assert archive.testzip() is None
            assert archive.read(MARKER).decode().strip() == hashlib.sha256(SOURCE.read_bytes()).hexdigest()
        assert patched_entries(jar) == committed_classes(), run
        assert [p.name for p in tmp_path.iterdir()] == ["model-server.jar"], run
    again = apply("--jar", str(jar), env=without_javac())
    assert again.returncode == 0 and "already patched" in again.stdout, again.stderr


def test_classes_not_built_from_the_source_are_refused(tmp_path, stock_jar):
    copy = tmp_path / "frontend-patch"
    shutil.copytree(PATCH, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / SOURCE.name).write_text(SOURCE.read_text() + "// edited, not compiled again\n")
    jar = tmp_path / "model-server.jar"
    shutil.copy(stock_jar, jar)
    assert_one_line_error(apply("--jar", str(jar), apply_py=copy / "apply.py"), "is not compiled from this",
                          "--rebuild")
    assert hashlib.sha256(jar.read_bytes()).hexdigest() == STOCK_JAR_SHA256


def write_jar(path, entries: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as jar:
        for name, data in entries.items():
            jar.writestr(name, data)
    return path.read_bytes()


@pytest.mark.parametrize("entries, message", [
    ({"META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n"}, "is not TorchServe 0.12.0's frontend"),
    ({MARKER: b"0" * 64 + b"\n"}, "pip install --force-reinstall --no-deps torchserve==0.12.0"),
    (None, "is not a jar"),
], ids=["another version", "another patch", "not a zip"])
def test_a_jar_it_was_not_written_for_gets_one_warning_and_is_left_as_it_was(tmp_path, entries, message):
    jar = tmp_path / "model-server.jar"
    if entries is None:
        jar.write_bytes(b"not a zip")
    before = jar.read_bytes() if entries is None else write_jar(jar, entries)
    assert_one_line_warning(apply("--jar", str(jar), env=without_javac()), message, "left as it is")
    assert jar.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model-server.jar"]


def test_another_torchserve_version_is_told_it_keeps_the_stock_frontend(tmp_path):
    jar = tmp_path / "model-server.jar"
    write_jar(jar, {"META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n"})
    assert_one_line_warning(apply("--jar", str(jar)), "stock frontend", "500")


def test_a_missing_jar_is_one_line(tmp_path):
    assert_one_line_error(apply("--jar", str(tmp_path / "model-server.jar")), "does not exist")


def test_no_torchserve_installed_is_one_line():
    # -S: without site-packages this Python has no TorchServe.
    result = subprocess.run([sys.executable, "-S", str(APPLY)], capture_output=True, text=True, timeout=60)
    assert_one_line_error(result, "TorchServe is not installed")
