"""A served classifier and its steps, as plain functions: load the model once, then image bytes ->
uint8 pixels at the model's size -> a normalized float32 batch -> probabilities -> answers.

`load_classifier` builds a `Classifier` once per worker (TorchServe) or process (KServe) from a model
directory: spec.json, the serialized model and the archive's `handler:` settings. Images become pixels
through the PNG fast path when they are plain PNGs at the model's size, else through Pillow
(handlers/image.py); a batch is normalized by one table lookup per pixel. What a request makes of
these steps, on every engine, is the inference contract (handlers/contract.py); nothing here knows
an engine or a protocol.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.archive import HandlerSettings
from handlers.errors import ClientError
from handlers.image import normalize, open_image, png_pixels_at_size, to_pixels
from handlers.spec import Spec


@dataclass(frozen=True)
class Classifier:
    """A loaded model: its spec (classes, input size, normalization), the pixel limit and the forward pass."""

    spec: Spec
    max_pixels: int
    infer: Callable[[np.ndarray], np.ndarray]  # float32 (N, C, H, W) -> logits (N, classes)
    device: str


# ---------------------------------------------------------------------------- loading

def threads_per_worker(workers: int, threads: int) -> int:
    """Split the CPU cores between workers: 2 workers x 2 threads on 2 cores thrash."""
    return threads if threads > 0 else max(1, (os.cpu_count() or 1) // max(1, workers))


def onnxruntime_backend(path: Path, threads: int, gpu_id: int | None) -> tuple[Callable, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers: list[Any] = ["CPUExecutionProvider"]
    if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_id}))
    session = ort.InferenceSession(str(path), options, providers=providers)
    input_name = session.get_inputs()[0].name
    device = f"cuda:{gpu_id}" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    return (lambda batch: session.run(None, {input_name: batch})[0]), device


def torchscript_backend(path: Path, threads: int, gpu_id: int | None) -> tuple[Callable, str]:
    import warnings

    import torch

    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{gpu_id}" if gpu_id is not None and torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still supported
        module = torch.jit.load(str(path), map_location=device).eval()

    def infer(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return infer, str(device)


def load_classifier(model_dir: Path, settings: HandlerSettings, workers: int, gpu_id: int | None) -> Classifier:
    spec = Spec.read(model_dir / "spec.json")
    threads = threads_per_worker(workers, settings.threads)
    make_backend = onnxruntime_backend if settings.backend == "onnxruntime" else torchscript_backend
    infer, device = make_backend(model_dir / settings.model_file, threads, gpu_id)
    return Classifier(spec, settings.max_pixels, infer, device)


# ---------------------------------------------------------------------------- the steps

def image_pixels(image_bytes: bytes, classifier: Classifier) -> np.ndarray:
    """Image bytes -> uint8 (C, H, W) at the model's size: the PNG fast path, else the general one.

    The fast path takes an image already at the model's size, which a stretch leaves as it is, and
    so does a crop that keeps all of it (crop_fraction 1); any other crop resizes it first."""
    shape = classifier.spec.input
    channels, height, width = shape.size
    if height * width <= classifier.max_pixels and (shape.fit == "stretch" or shape.crop_fraction == 1):
        pixels = png_pixels_at_size(image_bytes, channels, height, width)
        if pixels is not None:
            return pixels
    image = open_image(image_bytes, classifier.max_pixels, (width, height))
    try:
        return to_pixels(image, channels, height, width, shape.background, shape.fit, shape.crop_fraction)
    except (ClientError, MemoryError):
        raise
    except Exception as error:  # e.g. malformed EXIF that Pillow parses only now
        raise ClientError(f"corrupt image data ({type(error).__name__}: {error})"[:300]) from None


@functools.lru_cache(maxsize=8)
def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 (channels, 256): `normalize` of every uint8 value in every channel, computed by `normalize`
    itself, so looking pixels up in it gives exactly its values (in one operation instead of four)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (len(mean), 1, 256))
    return np.ascontiguousarray(normalize(values, np.float32(mean), np.float32(std))[:, 0, :])


def normalized_batch(pixels: list[np.ndarray], classifier: Classifier) -> np.ndarray:
    """uint8 (C, H, W) images at the model's size -> float32 (N, C, H, W), normalized as in training: one
    lookup per pixel in `normalization_table` (the same float32 operations as `normalize`, so the same values)."""
    table = normalization_table(classifier.spec.mean, classifier.spec.std)
    return table[np.arange(len(table)).reshape(1, -1, 1, 1), np.stack(pixels)]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so no exp overflows."""
    exponentials = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def probabilities_of_pixels(pixels: list[np.ndarray], classifier: Classifier) -> np.ndarray:
    """uint8 (C, H, W) images at the model's size -> probabilities float64 (N, classes), in one forward pass."""
    return softmax(classifier.infer(normalized_batch(pixels, classifier)))


def results(probabilities: np.ndarray, class_names: list[str], model_version: str | None = None) -> list[dict]:
    """Probabilities (N, classes) -> one {"label", "index", "probabilities", "model_version"} per image, classes
    in order; `model_version` names the archive's version that answered."""
    answers = []
    for row, index in zip(probabilities.tolist(), probabilities.argmax(axis=1).tolist()):
        answers.append({"label": class_names[index], "index": index, "probabilities": dict(zip(class_names, row)),
                        "model_version": model_version})
    return answers


@functools.lru_cache(maxsize=8)
def json_template(class_names: tuple[str, ...], model_version: str | None = None) -> tuple[str, tuple[str, ...]]:
    """A %-format string for one answer, and each label as a JSON string: what json.dumps writes. The
    version is a constant of the template, so it costs an answer nothing."""
    keys = ", ".join(json.dumps(name).replace("%", "%%") + ": %r" for name in class_names)
    version = json.dumps(model_version).replace("%", "%%")
    return ('{"label": %s, "index": %d, "probabilities": {' + keys + '}, "model_version": ' + version + "}",
            tuple(map(json.dumps, class_names)))


def results_json(probabilities: np.ndarray, class_names: list[str], model_version: str | None = None) -> list[str]:
    """The same answers as `results`, each as the text `json.dumps` gives for it, about 10x faster.

    A float's repr is what json.dumps writes for it; a non-finite probability (a broken model) is
    left to json.dumps itself, which writes NaN/Infinity its own way.
    """
    if not np.isfinite(probabilities).all():
        return [json.dumps(answer) for answer in results(probabilities, class_names, model_version)]
    template, labels = json_template(tuple(class_names), model_version)
    return [template % (labels[index], index, *row)
            for row, index in zip(probabilities.tolist(), probabilities.argmax(axis=1).tolist())]
