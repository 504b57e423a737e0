"""Patches TorchServe 0.12.0's frontend so that a form-typed body reaches the handler as raw bytes.

`curl --data-binary @image.png URL` without -H sends Content-Type application/x-www-form-urlencoded.
The stock frontend parses such a body as a form before any handler runs: the image reaches the
handler mangled into form fields, and a '%' that is not a valid escape (most PNGs hold one) makes
Netty's decoder throw, which TorchServe answers with 500. No configuration changes that.
InferenceRequestHandler.java beside this file is the 0.12.0 source with one change: only multipart
bodies are parsed as forms. With it, the same curl command is answered like `curl -T image.png`.

This compiles that file against the installed model-server.jar (javac from a JDK 17, --release 8
like the original build) and swaps the class inside the jar, atomically. It first checks that the
jar is 0.12.0's own, and it records the patch in the jar, so running it again does nothing.
`make venv` and the Dockerfile run it.

Run: python frontend-patch/apply.py [--jar PATH]   (default: the jar of the TorchServe installed
     in this Python); exit 0 when the jar is patched, 1 and one line on stderr when it cannot be.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("InferenceRequestHandler.java")
STOCK_JAR_SHA256 = "ce340411ce54beaacd3dcfa31644a9aa369a83a36ed687172ba1088a13123dfe"  # torchserve 0.12.0
MARKER = "META-INF/image-classifier-kit/frontend-patch.sha256"  # the patched source's sha256
REINSTALL = "pip install --force-reinstall --no-deps torchserve==0.12.0"


class PatchError(Exception):
    """What stops the patch, in one line for the user."""


def installed_jar() -> Path:
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise PatchError(f"TorchServe is not installed in {sys.executable}: install the kit's requirements first")
    return Path(spec.origin).parent / "frontend" / "model-server.jar"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def patch(jar: Path) -> str:
    """Patches `jar` in place unless it already is; returns what it did, in one line."""
    if not jar.is_file():
        raise PatchError(f"{jar} does not exist: is TorchServe 0.12.0 installed?")
    wanted = sha256(SOURCE.read_bytes())
    with zipfile.ZipFile(jar) as archive:
        if MARKER in archive.namelist():
            if archive.read(MARKER).decode().strip() == wanted:
                return f"{jar} is already patched"
            raise PatchError(f"{jar} holds another version of the kit's patch: {REINSTALL}, then run this again")
    if sha256(jar.read_bytes()) != STOCK_JAR_SHA256:
        raise PatchError(f"{jar} is not TorchServe 0.12.0's frontend (its sha256 differs): the patch is "
                         f"written for that version ({REINSTALL})")
    with tempfile.TemporaryDirectory() as build:
        classes = compile_source(jar, Path(build))
        replace_entries(jar, classes, wanted)
    return f"patched {jar}: form-typed bodies now reach the handler as raw bytes ({', '.join(sorted(classes))})"


def compile_source(jar: Path, build: Path) -> dict[str, bytes]:
    """javac's output for SOURCE, as {entry name in the jar: class file bytes}."""
    javac = shutil.which("javac")
    if javac is None:
        raise PatchError("javac not found: patching TorchServe's frontend needs a JDK 17 "
                         "(e.g. apt-get install openjdk-17-jdk-headless)")
    done = subprocess.run([javac, "--release", "8", "-nowarn", "-cp", str(jar), "-d", str(build), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()[:1]
        raise PatchError(f"javac could not compile {SOURCE.name}: {first[0] if first else done.returncode}")
    return {path.relative_to(build).as_posix(): path.read_bytes() for path in build.rglob("*.class")}


def replace_entries(jar: Path, classes: dict[str, bytes], source_sha256: str) -> None:
    """Writes a copy of `jar` with `classes` in place of the same entries, plus the marker, then
    renames it over `jar`: an interrupted run leaves the original untouched."""
    temporary = jar.with_name(f".{jar.name}.{os.getpid()}.tmp")  # not *.jar: never on TorchServe's classpath
    try:
        with zipfile.ZipFile(jar) as original, zipfile.ZipFile(temporary, "w") as patched:
            missing = set(classes) - set(original.namelist())
            if missing:
                raise PatchError(f"{jar} has no {', '.join(sorted(missing))}: not TorchServe 0.12.0's frontend")
            for entry in original.infolist():
                patched.writestr(entry, classes.get(entry.filename) or original.read(entry))
            patched.writestr(MARKER, source_sha256 + "\n")
        shutil.copymode(jar, temporary)
        os.replace(temporary, jar)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jar", type=Path, default=None, help="model-server.jar to patch (default: the installed one)")
    args = p.parse_args(argv)
    try:
        jar = args.jar or installed_jar()
        print(patch(jar))
    except zipfile.BadZipFile as error:
        print(f"error: {jar} is not a jar: {error}", file=sys.stderr)
        return 1
    except (PatchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
