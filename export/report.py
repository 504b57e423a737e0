"""After export: record the archives built from this checkpoint (archives.json) and update the
run's report (training/report.py renders it from the run's files).

An archive belongs to the run when the spec.json inside it names this checkpoint's sha256: what
is described is what TorchServe will load, read from the .mar itself, not what export meant to write.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from handlers.archive import read_archive
from handlers.errors import UserError
from handlers.spec import Spec
from training.checkpoint import write_json_atomic
from training.report import write_report


def describe_archive(path: Path, checkpoint_sha256: str) -> dict | None:
    """The archive's serving settings, or None when it holds another model (or is no archive)."""
    try:
        archive = read_archive(path)
    except UserError:
        return None
    if archive.spec.checkpoint_sha256 != checkpoint_sha256:
        return None
    data = path.read_bytes()
    config = archive.model_config
    return {"path": str(path), "model": archive.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "backend": archive.settings.backend, "workers": config.get("minWorkers"),
            "batch_size": config.get("batchSize"), "max_batch_delay_ms": config.get("maxBatchDelay")}


def update_report(out_dir: Path, model_store: Path) -> Path:
    """Writes archives.json (the model store's archives of this checkpoint), then report.html."""
    checkpoint_sha256 = Spec.read(out_dir / "spec.json").checkpoint_sha256
    archives = [described for path in sorted(model_store.glob("*.mar"))
                if (described := describe_archive(path, checkpoint_sha256)) is not None]
    write_json_atomic(out_dir / "archives.json", {"checkpoint_sha256": checkpoint_sha256,
                                                  "model_store": str(model_store), "archives": archives})
    path = write_report(out_dir)
    print(f"report: {path}")
    return path
