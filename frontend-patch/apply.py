"""Patches TorchServe 0.12.0's frontend so that a form-typed body reaches the handler as raw bytes.

`curl --data-binary @image.png URL` without -H sends Content-Type application/x-www-form-urlencoded.
The stock frontend parses such a body as a form before any handler runs: the image reaches the
handler mangled into form fields, and a '%' that is not a valid escape (most PNGs hold one) makes
Netty's decoder throw, which TorchServe answers with 500. No configuration changes that.
InferenceRequestHandler.java beside this file is the 0.12.0 source with one change: only multipart
bodies are parsed as forms. With it, the same curl command is answered like `curl -T image.png`.

classes/ holds that source compiled once (javac from a JDK 17, --release 8 like the original
build) and built-from.sha256, the sha256 of the source it was compiled from. Patching swaps those
classes into the installed model-server.jar, atomically, and needs no compiler: a Java runtime
serves. It first checks that the jar is 0.12.0's own, and it records the patch in the jar, so a run
on a patched jar only reads that record and changes nothing, while a reinstalled (stock) jar is
patched again. `make java` runs it every time; the Dockerfile runs it once in its build stage.

A jar it was not written for (another TorchServe version, another version of this patch, not a
zip) is left as it is, with one warning line: TorchServe then runs its stock frontend, which
answers a form-typed body with 500 (`curl -T` or `-H 'Content-Type: application/octet-stream'`
are answered either way).

Run: python frontend-patch/apply.py [--jar PATH]   (default: the jar of the TorchServe installed
     in this Python); exit 0 when the jar is patched or left as it is with one warning line on
     stderr, 1 and one error line when there is no jar or it cannot be written.
     python frontend-patch/apply.py --rebuild [--jar PATH]   compiles the source into classes/
     again (needs javac; the jar, stock or patched, provides TorchServe's other classes).
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

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "InferenceRequestHandler.java"
CLASSES = HERE / "classes"  # the compiled source, laid out as the jar's entries
BUILT_FROM = CLASSES / "built-from.sha256"  # the sha256 of the source that classes/ was compiled from
STOCK_JAR_SHA256 = "ce340411ce54beaacd3dcfa31644a9aa369a83a36ed687172ba1088a13123dfe"  # torchserve 0.12.0
MARKER = "META-INF/image-classifier-kit/frontend-patch.sha256"  # the patched source's sha256
REINSTALL = "pip install --force-reinstall --no-deps torchserve==0.12.0"
STOCK_500 = ("TorchServe runs its stock frontend, which answers a form-typed body (curl --data-binary "
             "without -H) with 500")


class PatchError(Exception):
    """What stops the patch where serving cannot work either, in one line for the user."""


class UnknownJar(Exception):
    """A jar the patch was not written for: left as it is, in one line for the user."""


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
    try:
        with zipfile.ZipFile(jar) as archive:
            if MARKER in archive.namelist():
                if archive.read(MARKER).decode().strip() == wanted:
                    return f"{jar} is already patched"
                raise UnknownJar(f"{jar} holds another version of the kit's patch, left as it is: "
                                 f"{REINSTALL}, then run this again")
    except zipfile.BadZipFile as error:
        raise UnknownJar(f"{jar} is not a jar ({error}), left as it is: TorchServe cannot start from it "
                         f"({REINSTALL})") from None
    if sha256(jar.read_bytes()) != STOCK_JAR_SHA256:
        raise UnknownJar(f"{jar} is not TorchServe 0.12.0's frontend (its sha256 differs), left as it is: "
                         f"{STOCK_500}; the kit's patch is written for 0.12.0 ({REINSTALL})")
    classes = committed_classes(wanted)
    replace_entries(jar, classes, wanted)
    return f"patched {jar}: form-typed bodies now reach the handler as raw bytes ({', '.join(sorted(classes))})"


def committed_classes(source_sha256: str) -> dict[str, bytes]:
    """classes/, as {entry name in the jar: class file bytes}, once it is known to be built from SOURCE."""
    built_from = BUILT_FROM.read_text().strip() if BUILT_FROM.is_file() else None
    if built_from != source_sha256:
        raise PatchError(f"{CLASSES} is not compiled from this {SOURCE.name}: "
                         f"rebuild it with python {Path(__file__).name} --rebuild (needs javac, a JDK 17)")
    return {path.relative_to(CLASSES).as_posix(): path.read_bytes() for path in sorted(CLASSES.rglob("*.class"))}


def compile_source(jar: Path, build: Path) -> dict[str, bytes]:
    """javac's output for SOURCE against `jar`'s classes, as {entry name in the jar: class file bytes}."""
    javac = shutil.which("javac")
    if javac is None:
        raise PatchError("javac not found: compiling the frontend patch needs a JDK 17 "
                         "(e.g. apt-get install openjdk-17-jdk-headless)")
    done = subprocess.run([javac, "--release", "8", "-nowarn", "-cp", str(jar), "-d", str(build), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()[:1]
        raise PatchError(f"javac could not compile {SOURCE.name}: {first[0] if first else done.returncode}")
    return {path.relative_to(build).as_posix(): path.read_bytes() for path in sorted(build.rglob("*.class"))}


def rebuild(jar: Path) -> str:
    """Compiles SOURCE into classes/ again (a fresh folder, swapped in whole) and stamps it."""
    if not jar.is_file():
        raise PatchError(f"{jar} does not exist: is TorchServe 0.12.0 installed?")
    with tempfile.TemporaryDirectory(dir=HERE) as build:
        classes = compile_source(jar, Path(build) / "classes")
        (Path(build) / "classes" / BUILT_FROM.name).write_text(sha256(SOURCE.read_bytes()) + "\n")
        shutil.rmtree(CLASSES, ignore_errors=True)
        os.replace(Path(build) / "classes", CLASSES)
    return f"compiled {SOURCE.name} into {CLASSES} ({', '.join(classes)})"


def replace_entries(jar: Path, classes: dict[str, bytes], source_sha256: str) -> None:
    """Writes a copy of `jar` with `classes` in place of the same entries (and added where the jar has
    none, e.g. a new inner class), plus the marker, then renames it over `jar`: an interrupted run
    leaves the original untouched."""
    temporary = jar.with_name(f".{jar.name}.{os.getpid()}.tmp")  # not *.jar: never on TorchServe's classpath
    try:
        with zipfile.ZipFile(jar) as original, zipfile.ZipFile(temporary, "w") as patched:
            for entry in original.infolist():
                patched.writestr(entry, classes.get(entry.filename) or original.read(entry))
            for name in sorted(set(classes) - set(original.namelist())):
                patched.writestr(zipfile.ZipInfo(name), classes[name], compress_type=zipfile.ZIP_DEFLATED)
            patched.writestr(MARKER, source_sha256 + "\n")
        shutil.copymode(jar, temporary)
        os.replace(temporary, jar)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jar", type=Path, default=None, help="model-server.jar to patch (default: the installed one)")
    p.add_argument("--rebuild", action="store_true", help="compile the source into classes/ again (needs javac)")
    args = p.parse_args(argv)
    try:
        jar = args.jar or installed_jar()
        print(rebuild(jar) if args.rebuild else patch(jar))
    except UnknownJar as warning:
        print(f"warning: {warning}", file=sys.stderr)
    except (PatchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
