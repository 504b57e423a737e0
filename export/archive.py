"""TorchServe archives (.mar) with torch-model-archiver, built in a scratch folder inside
model_store/ and renamed into place, so a failed build never replaces a good archive.

Each archive is one version of its name: model_store/<name>.v<N>.mar (handlers/store.py), with N in
TorchServe's manifest and in the spec it carries, and release.json (export/versions.py): the export
gates' outcome, the test accuracy and a few test images with the answers this archive gives them."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from handlers.archive import DEFAULT_MAX_PIXELS, MODEL_CONFIG, RELEASE, SPEC
from handlers.spec import Spec
from handlers.store import archive_path
from training.errors import UserError

HANDLERS_DIR = Path(__file__).resolve().parents[1] / "handlers"
ARCHIVER = str(Path(sys.executable).parent / "torch-model-archiver")


@dataclass(frozen=True)
class ServingConfig:
    """What goes into each archive's model-config.yaml."""

    workers: int = 2  # per model; each gets CPU cores / workers intra-op threads
    batch_size: int = 16  # TorchServe's dynamic batching: up to this many requests per forward pass
    max_batch_delay_ms: int = 1  # how long a batch waits to fill up (adds to latency at low load)
    response_timeout_s: int = 30
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images get 413 before they are decoded

    def model_config(self, backend: str) -> dict:
        return {"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout": self.response_timeout_s,
                "handler": {"backend": backend, "max_pixels": self.max_pixels}}


def handler_modules(entry: str = "torchserve_handler.py") -> list[str]:
    """The files of handlers/ that TorchServe's workers import, starting from `entry`: the package's
    own imports (`from handlers.x import ...`, `from handlers import x`), followed to the end."""
    found, pending = {"__init__.py"}, [entry]
    while pending:
        module = pending.pop()
        if module in found:
            continue
        found.add(module)
        for node in ast.walk(ast.parse((HANDLERS_DIR / module).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "handlers":
                pending += [f"{alias.name}.py" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("handlers."):
                pending.append(node.module.split(".")[1] + ".py")
    return sorted(found)


def ensure_writable(model_store: Path) -> None:
    """Fails early (before any export work) when model_store cannot take an archive."""
    try:
        model_store.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=model_store, prefix=".probe-")
        probe.close()
    except OSError as error:
        raise UserError(f"cannot write archives to {model_store} ({error.strerror or error}): "
                        "choose a writable --model-store") from None


def build_archive(model_name: str, model_file: Path, spec_file: Path, backend: str, model_store: Path,
                  serving: ServingConfig, version: int = 1, release: dict | None = None) -> Path:
    """Packs model + spec (carrying `version`) + release.json + handlers + model-config.yaml into
    model_store/<model_name>.v<version>.mar."""
    scratch = Path(tempfile.mkdtemp(dir=model_store, prefix=f".build-{model_name}-"))
    try:
        package = scratch / "extra" / "handlers"  # the archiver copies a folder's contents: nest it once
        package.mkdir(parents=True)
        for module in handler_modules():
            shutil.copy2(HANDLERS_DIR / module, package / module)
        versioned_spec = scratch / "extra" / SPEC
        versioned_spec.write_text(Spec.read(spec_file).with_version(version).to_json())
        (scratch / "extra" / RELEASE).write_text(json.dumps({"version": version, **(release or {})}))
        config_file = scratch / MODEL_CONFIG
        config_file.write_text(yaml.safe_dump(serving.model_config(backend), sort_keys=False))
        (scratch / "tmp").mkdir()
        command = [ARCHIVER, "--model-name", model_name, "--version", str(version),
                   "--serialized-file", str(model_file),
                   "--handler", str(HANDLERS_DIR / "torchserve_handler.py"),
                   "--extra-files", str(scratch / "extra"), "--config-file", str(config_file),
                   "--export-path", str(scratch), "--archive-format", "default", "--force"]
        # The archiver stages files in $TMPDIR/<model name> and deletes that first: keep it private.
        env = {**os.environ, "TMPDIR": str(scratch / "tmp")}
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        except OSError as error:
            raise UserError(f"cannot run torch-model-archiver ({error}): run `make venv`") from None
        built = scratch / f"{model_name}.mar"
        if result.returncode != 0 or not built.is_file():
            last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"torch-model-archiver failed for {model_name} (exit {result.returncode}): {last}")
        with open(built, "rb") as f:  # on disk before it replaces the old archive
            os.fsync(f.fileno())
        target = archive_path(model_store, model_name, version)
        os.replace(built, target)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
