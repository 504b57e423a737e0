"""After export: record the archives built from this checkpoint (archives.json) and update the
run's report (training/report.py renders it from the run's files).

An archive belongs to the run when the spec.json inside it names this checkpoint's sha256: what
is described is what TorchServe will load, read from the .mar itself, not what export meant to write.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import yaml

from training.checkpoint import write_json_atomic
from training.report import write_report


def describe_archive(path: Path, checkpoint_sha256: str) -> dict | None:
    """The archive's serving settings, or None when it holds another model (or is no archive)."""
    try:
        with zipfile.ZipFile(path) as archive:
            spec = json.loads(archive.read("spec.json"))
            settings = yaml.safe_load(archive.read("model-config.yaml"))
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        model_name = manifest["model"]["modelName"]
    except (zipfile.BadZipFile, KeyError, TypeError, OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(spec, dict) or spec.get("checkpoint_sha256") != checkpoint_sha256:
        return None
    data = path.read_bytes()
    return {"path": str(path), "model": model_name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "backend": settings.get("handler", {}).get("backend"), "workers": settings.get("minWorkers"),
            "batch_size": settings.get("batchSize"), "max_batch_delay_ms": settings.get("maxBatchDelay")}


def update_report(out_dir: Path, model_store: Path) -> Path:
    """Writes archives.json (the model store's archives of this checkpoint), then report.html."""
    checkpoint_sha256 = json.loads((out_dir / "spec.json").read_text())["checkpoint_sha256"]
    archives = [described for path in sorted(model_store.glob("*.mar"))
                if (described := describe_archive(path, checkpoint_sha256)) is not None]
    write_json_atomic(out_dir / "archives.json", {"checkpoint_sha256": checkpoint_sha256,
                                                  "model_store": str(model_store), "archives": archives})
    path = write_report(out_dir)
    print(f"report: {path}")
    return path
