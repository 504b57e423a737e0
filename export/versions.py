"""Every export is a version: which version an export gets, and what it records about it.

`next_version` mints the next version of a name (1, 2, 3, ...), unless the newest archive of that
name holds the same checkpoint with the same serving settings: then the export rewrites that version
instead of minting a new one. `release_record` is each archive's release.json: the export gates'
outcome, the format's test accuracy and a few real test images (PNG) with the probabilities this
archive's own pipeline gives them, which `make rollout` compares with the running server's answers.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from export.archive import ServingConfig
from handlers.archive import BrokenArchive, HandlerSettings, read_archive
from handlers.pipeline import image_pixels, load_classifier, probabilities_of_pixels
from handlers.spec import Spec
from handlers.store import versions

SAMPLE_IMAGES = 8  # test images recorded per archive


def next_version(model_store: Path, name: str, spec: Spec, serving: ServingConfig) -> int:
    """The version this export of `name` gets: the newest one again when nothing changed, else one more."""
    existing = versions(model_store).get(name, {})
    if not existing:
        return 1
    newest = max(existing)
    try:
        archive = read_archive(existing[newest])
    except BrokenArchive:
        return newest + 1
    unchanged = (archive.spec.checkpoint_sha256 == spec.checkpoint_sha256 is not None
                 and archive.model_config == serving.model_config(archive.settings.backend))
    return newest if unchanged else newest + 1


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes, as a client sends them."""
    pixels = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_pngs(test_images, count: int = SAMPLE_IMAGES) -> list[bytes]:
    """The first `count` test images (uint8 (N, C, H, W) tensor) as PNG files."""
    return [png_bytes(np.asarray(image)) for image in test_images[:count]]


def release_record(model_dir: Path, model_file: str, backend: str, pngs: list[bytes], gates_passed: bool,
                   test_accuracy: float) -> dict:
    """release.json of one archive: its gates, its test accuracy, and `pngs` with its answers to them."""
    record = {"gates_passed": bool(gates_passed), "test_accuracy": float(test_accuracy), "samples": []}
    if pngs:
        classifier = load_classifier(model_dir, HandlerSettings(backend, model_file), 1, None)
        # what /predictions answers for each (handlers/contract.py predictions_json)
        probabilities = probabilities_of_pixels([image_pixels(png, classifier) for png in pngs], classifier)
        record["samples"] = [{"png": base64.b64encode(png).decode(), "probabilities": row}
                             for png, row in zip(pngs, probabilities.tolist())]
    return record
