"""The kit's serving pipeline for the peer frameworks' servers (bench/peers/*_server.py), in their venv.

It loads the archive the kit serves (model_store/NAME.mar: spec.json and model.onnx) and answers
through the kit's own functions (handlers/pipeline.py, handlers/image.py: NumPy, Pillow, PyYAML and
ONNX Runtime, nothing of TorchServe or KServe): decode with Pillow (the kit's PNG fast path, else the
general path: orientation, conversion, bilinear resize), normalize with the spec's mean/std, one
forward pass per batch, softmax, and each answer as the JSON text TorchServe's /predictions sends,
{"label", "index", "probabilities": {class: p}}. So every framework answers exactly what the kit does.

The servers read their settings from the environment (PEER_ARCHIVE, PEER_WORKERS, PEER_THREADS,
PEER_MAX_BATCH, PEER_MAX_DELAY_MS, PEER_TIMEOUT_S), which reaches every process a framework starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from handlers.archive import read_archive  # noqa: E402
from handlers.contract import predictions_json  # noqa: E402
from handlers.pipeline import load_classifier  # noqa: E402

Answer = tuple[int, str]  # (HTTP status, JSON text)


@dataclasses.dataclass(frozen=True)
class Settings:
    archive: Path
    workers: int  # processes or replicas serving the model
    threads: int  # ONNX Runtime intra-op threads per worker
    max_batch: int
    max_delay_ms: float
    timeout_s: float  # a request's time limit (the archive's responseTimeout)

    @classmethod
    def from_environment(cls) -> Settings:
        return cls(Path(os.environ["PEER_ARCHIVE"]), int(os.environ.get("PEER_WORKERS", "2")),
                   int(os.environ.get("PEER_THREADS", "1")), int(os.environ.get("PEER_MAX_BATCH", "16")),
                   float(os.environ.get("PEER_MAX_DELAY_MS", "1")), float(os.environ.get("PEER_TIMEOUT_S", "30")))


def load(settings: Settings | None = None) -> Callable[[list[bytes]], list[Answer]]:
    """The archive's classifier as one function: encoded images -> one (status, JSON text) each, in one
    forward pass for the good ones; a bad image gets its own 4xx and message, as on TorchServe."""
    settings = settings or Settings.from_environment()
    archive = read_archive(settings.archive)
    model_dir = archive.unpack(Path(tempfile.mkdtemp(prefix="peer-model-")))
    classifier = load_classifier(model_dir, dataclasses.replace(archive.settings, threads=settings.threads),
                                 settings.workers, None)

    def classify(images: list[bytes]) -> list[Answer]:
        outcome = predictions_json([{"body": image} for image in images], classifier)
        return [(200, entry) if isinstance(entry, str)
                else (getattr(entry, "status", 400), json.dumps({"error": str(entry)})) for entry in outcome]

    return classify
