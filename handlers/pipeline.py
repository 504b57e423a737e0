"""The serving pipeline as plain functions: decode -> preprocess -> infer -> postprocess.

Nothing here knows TorchServe; `handlers/torchserve_handler.py` adapts it, and `handlers/kserve_model.py`
(KServe's ModelServer) too. A `Classifier` is built once per worker from the model directory (spec.json +
the serialized model + the archive's settings).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handlers.image import BadImage, normalize, open_image, to_pixels

BACKENDS = ("onnxruntime", "torchscript")
DEFAULT_MAX_PIXELS = 24_000_000  # a 24-megapixel photo decodes to 72 MB of RGB: refuse beyond that
IMAGE_FIELDS = ("data", "body", "file", "image")  # request fields that may carry the image


@dataclass(frozen=True)
class Settings:
    """The archive's `handler:` section of model-config.yaml, validated."""

    backend: str
    model_file: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 0  # intra-op threads per worker; 0 = CPU count / workers

    @classmethod
    def from_yaml(cls, handler_section: dict, model_file: str) -> Settings:
        known = {"backend", "max_pixels", "threads"}
        unknown = set(handler_section) - known
        if unknown:
            raise ValueError(f"unknown handler setting(s) in model-config.yaml: {sorted(unknown)}")
        backend = handler_section.get("backend")
        if backend not in BACKENDS:
            raise ValueError(f"model-config.yaml handler.backend must be one of {BACKENDS}, not {backend!r}")
        return cls(backend, model_file, int(handler_section.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   int(handler_section.get("threads", 0)))


@dataclass(frozen=True)
class Classifier:
    spec: dict
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


def load_classifier(model_dir: Path, settings: Settings, workers: int, gpu_id: int | None) -> Classifier:
    spec = json.loads((model_dir / "spec.json").read_text())
    threads = threads_per_worker(workers, settings.threads)
    make_backend = onnxruntime_backend if settings.backend == "onnxruntime" else torchscript_backend
    infer, device = make_backend(model_dir / settings.model_file, threads, gpu_id)
    return Classifier(spec, np.asarray(spec["mean"], dtype=np.float32), np.asarray(spec["std"], dtype=np.float32),
                      settings.max_pixels, infer, device)


# ---------------------------------------------------------------------------- one request, N images (OIP)

def probabilities_of_images(images: list[bytes], classifier: Classifier) -> np.ndarray:
    """N encoded images -> probabilities float64 (N, classes) in one forward pass. The images come in
    one request, which succeeds or fails as a whole: a bad image raises BadImage naming its position."""
    inputs = []
    for position, image in enumerate(images):
        try:
            inputs.append(preprocess(image, classifier))
        except BadImage as error:
            raise BadImage(f"image {position}: {error}", error.status) from None
    return probabilities_of_inputs(np.stack(inputs), classifier)


def probabilities_of_inputs(batch: np.ndarray, classifier: Classifier) -> np.ndarray:
    """Normalized float32 (N, C, H, W), as `preprocess` makes them -> probabilities float64 (N, classes)."""
    return softmax(classifier.infer(batch))


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


def preprocess(image_bytes: bytes, classifier: Classifier) -> np.ndarray:
    """Image bytes -> float32 (C, H, W), normalized as in training."""
    shape = classifier.spec["input"]
    image = open_image(image_bytes, classifier.max_pixels)
    pixels = to_pixels(image, shape["channels"], shape["height"], shape["width"], tuple(shape["background"]))
    return normalize(pixels, classifier.mean, classifier.std)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so no exp overflows."""
    exponentials = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def postprocess(logits: np.ndarray, class_names: list[str]) -> list[dict]:
    """Logits (N, classes) -> one {"label", "index", "probabilities"} per image, classes in order."""
    probabilities = softmax(logits)
    results = []
    for row in probabilities:
        index = int(row.argmax())
        results.append({"label": class_names[index], "index": index,
                        "probabilities": {name: float(p) for name, p in zip(class_names, row)}})
    return results


def classify_batch(requests: list[dict], classifier: Classifier) -> list[dict | BadImage]:
    """One forward pass for the good images of a batch; a bad image fails only its own entry."""
    inputs: list[np.ndarray] = []
    outcome: list[Any] = []
    for request in requests:
        try:
            inputs.append(preprocess(decode_request(request), classifier))
            outcome.append(len(inputs) - 1)
        except BadImage as error:
            outcome.append(error)
    if inputs:
        predictions = postprocess(classifier.infer(np.stack(inputs)), classifier.spec["class_names"])
    return [entry if isinstance(entry, BadImage) else predictions[entry] for entry in outcome]
