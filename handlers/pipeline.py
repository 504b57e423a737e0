"""The serving pipeline as plain functions: decode -> preprocess -> infer -> results.

Nothing here knows TorchServe; `handlers/torchserve_handler.py` adapts it, and `handlers/kserve_model.py`
(KServe's ModelServer) too. A `Classifier` is built once per worker from the model directory (spec.json +
the serialized model + the archive's settings).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.archive import HandlerSettings
from handlers.image import BadImage, normalize, open_image, png_pixels_at_size, to_pixels
from handlers.spec import Spec

IMAGE_FIELDS = ("data", "body", "file", "image")  # request fields that may carry the image


@dataclass(frozen=True)
class Classifier:
    spec: Spec
    mean: np.ndarray  # float32 (C,)
    std: np.ndarray
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
    return Classifier(spec, np.asarray(spec.mean, dtype=np.float32), np.asarray(spec.std, dtype=np.float32),
                      settings.max_pixels, infer, device)


# ---------------------------------------------------------------------------- the four steps

def decode_request(request: dict) -> bytes:
    """A TorchServe request row -> image bytes: raw body, multipart field, or JSON {"data": base64}."""
    payload = next((request[k] for k in IMAGE_FIELDS if request.get(k) is not None), None)
    if payload is None:  # a multipart upload under another field name
        payload = next((v for v in request.values() if isinstance(v, (bytes, bytearray))), None)
    if isinstance(payload, dict):  # TorchServe parsed an application/json body
        encoded = payload.get("data")
        if not isinstance(encoded, str):
            raise BadImage('JSON body must be {"data": "<base64-encoded image>"}')
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage('"data" is not valid base64') from None
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):  # a text/* content type: not an image
        raise BadImage("body is text, not an image: send the image bytes (curl -T img.png)")
    if payload is None:
        raise BadImage("empty request body: send the image bytes")
    raise BadImage('JSON body must be {"data": "<base64-encoded image>"}')


def image_pixels(image_bytes: bytes, classifier: Classifier) -> np.ndarray:
    """Image bytes -> uint8 (C, H, W) at the model's size: the PNG fast path, else the general one."""
    shape = classifier.spec.input
    channels, height, width = shape.size
    if height * width <= classifier.max_pixels:
        pixels = png_pixels_at_size(image_bytes, channels, height, width)
        if pixels is not None:
            return pixels
    image = open_image(image_bytes, classifier.max_pixels, (width, height))
    try:
        return to_pixels(image, channels, height, width, shape.background)
    except (BadImage, MemoryError):
        raise
    except Exception as error:  # e.g. malformed EXIF that Pillow parses only now
        raise BadImage(f"corrupt image data ({type(error).__name__}: {error})"[:300]) from None


def preprocess(image_bytes: bytes, classifier: Classifier) -> np.ndarray:
    """Image bytes -> float32 (C, H, W), normalized as in training."""
    return normalize(image_pixels(image_bytes, classifier), classifier.mean, classifier.std)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so no exp overflows."""
    exponentials = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def results(probabilities: np.ndarray, class_names: list[str]) -> list[dict]:
    """Probabilities (N, classes) -> one {"label", "index", "probabilities"} per image, classes in order."""
    answers = []
    for row, index in zip(probabilities.tolist(), probabilities.argmax(axis=1).tolist()):
        answers.append({"label": class_names[index], "index": index, "probabilities": dict(zip(class_names, row))})
    return answers


@functools.lru_cache(maxsize=8)
def json_template(class_names: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """A %-format string for one answer, and each label as a JSON string: what json.dumps writes."""
    keys = ", ".join(json.dumps(name).replace("%", "%%") + ": %r" for name in class_names)
    return '{"label": %s, "index": %d, "probabilities": {' + keys + "}}", tuple(map(json.dumps, class_names))


def results_json(probabilities: np.ndarray, class_names: list[str]) -> list[str]:
    """The same answers as `results`, each as the text `json.dumps` gives for it, about 10x faster.

    A float's repr is what json.dumps writes for it; a non-finite probability (a broken model) is
    left to json.dumps itself, which writes NaN/Infinity its own way.
    """
    if not np.isfinite(probabilities).all():
        return [json.dumps(answer) for answer in results(probabilities, class_names)]
    template, labels = json_template(tuple(class_names))
    return [template % (labels[index], index, *row)
            for row, index in zip(probabilities.tolist(), probabilities.argmax(axis=1).tolist())]


@functools.lru_cache(maxsize=8)
def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 (channels, 256): `normalize` of every uint8 value in every channel, computed by `normalize`
    itself, so looking pixels up in it gives exactly its values (in one operation instead of four)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (len(mean), 1, 256))
    return np.ascontiguousarray(normalize(values, np.float32(mean), np.float32(std))[:, 0, :])


def probabilities_of_batch(requests: list[dict], classifier: Classifier) -> tuple[list[int | BadImage], np.ndarray]:
    """One forward pass for the good images of a batch: (per request, the row of its probabilities or
    its BadImage; the probabilities, float64 (good images, classes)). Pixels are normalized as one
    batch (the same float32 operations as one image at a time, so the same values)."""
    pixels: list[np.ndarray] = []
    outcome: list[int | BadImage] = []
    for request in requests:
        try:
            pixels.append(image_pixels(decode_request(request), classifier))
            outcome.append(len(pixels) - 1)
        except BadImage as error:
            outcome.append(error)
    if not pixels:
        return outcome, np.empty((0, classifier.spec.num_classes))
    return outcome, probabilities_of_pixels(pixels, classifier)


def probabilities_of_pixels(pixels: list[np.ndarray], classifier: Classifier) -> np.ndarray:
    """uint8 (C, H, W) images at the model's size -> probabilities float64 (N, classes), normalized as
    one batch (the same float32 operations as one image at a time, so the same values)."""
    table = normalization_table(tuple(classifier.mean.tolist()), tuple(classifier.std.tolist()))
    batch = table[np.arange(len(table)).reshape(1, -1, 1, 1), np.stack(pixels)]  # one lookup per pixel
    return probabilities_of_inputs(batch, classifier)


def probabilities_of_inputs(batch: np.ndarray, classifier: Classifier) -> np.ndarray:
    """Normalized float32 (N, C, H, W), as `preprocess` makes them -> probabilities float64 (N, classes)."""
    return softmax(classifier.infer(batch))


def probabilities_of_images(images: list[bytes], classifier: Classifier) -> np.ndarray:
    """N encoded images of one request (the Open Inference Protocol's `image` input) -> probabilities
    float64 (N, classes) in one forward pass. The request succeeds or fails as a whole: a bad image
    raises BadImage naming its position."""
    pixels = []
    for position, image in enumerate(images):
        try:
            pixels.append(image_pixels(image, classifier))
        except BadImage as error:
            raise BadImage(f"image {position}: {error}", error.status) from None
    return probabilities_of_pixels(pixels, classifier)


def classify_batch(requests: list[dict], classifier: Classifier) -> list[dict | BadImage]:
    """One forward pass for the good images of a batch; a bad image fails only its own entry."""
    outcome, probabilities = probabilities_of_batch(requests, classifier)
    answers = results(probabilities, classifier.spec.class_names)
    return [entry if isinstance(entry, BadImage) else answers[entry] for entry in outcome]


def classify_batch_json(requests: list[dict], classifier: Classifier) -> list[str | BadImage]:
    """`classify_batch` with each answer already JSON text (what the TorchServe handler returns)."""
    outcome, probabilities = probabilities_of_batch(requests, classifier)
    answers = results_json(probabilities, classifier.spec.class_names)
    return [entry if isinstance(entry, BadImage) else answers[entry] for entry in outcome]
