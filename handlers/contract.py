"""The inference contract: what a served classifier does with a request, the same on every engine.

Both adapters call these functions and translate only their engine's requests and answers:
handlers/torchserve_handler.py (TorchServe) and handlers/kserve_model.py (KServe's ModelServer).

  setup            pipeline.load_classifier(model_dir, settings, workers, gpu_id) -> Classifier, once per
                   worker or process
  /predictions     predictions_json(rows, classifier): a TorchServe batch of requests, each carrying one
                   image -> per request its answer as JSON text or its ClientError; one forward pass for
                   the batch's good images, a bad one fails only its own request
  Open Inference   infer_tensors(inputs, requested, classifier): the protocol's decoded input tensors ->
  Protocol         the requested output tensors (handlers/oip.py says what they are); one forward pass
                   for the request's N images, which succeeds or fails as a whole. It is two halves,
                   model_batch (decode, normalize) and output_tensors (softmax, outputs), between which
                   the KServe path puts its adaptive batcher (handlers/batching.py)
  metadata         classifier_metadata(classifier): the spec and the pixel limit, for clients (the demo
                   page); the protocol's own metadata is oip.model_metadata

Every refusal is a handlers.errors.ClientError carrying its HTTP status (400, 413, 415); each adapter
answers it in its engine's form.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from handlers import oip
from handlers.errors import ClientError
from handlers.pipeline import (
    Classifier,
    image_pixels,
    normalized_batch,
    probabilities_of_pixels,
    results_json,
    softmax,
)

IMAGE_FIELDS = ("data", "body", "file", "image")  # request fields that may carry the image


def image_bytes_of_row(row: dict) -> bytes:
    """One TorchServe request row -> its image bytes: raw body, multipart field, or JSON {"data": base64}."""
    payload = next((row[k] for k in IMAGE_FIELDS if row.get(k) is not None), None)
    if payload is None:  # a multipart upload under another field name
        payload = next((v for v in row.values() if isinstance(v, (bytes, bytearray))), None)
    if isinstance(payload, dict):  # TorchServe parsed an application/json body
        encoded = payload.get("data")
        if not isinstance(encoded, str):
            raise ClientError('JSON body must be {"data": "<base64-encoded image>"}')
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError('"data" is not valid base64') from None
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    if isinstance(payload, str):  # a text/* content type: not an image
        raise ClientError("body is text, not an image: send the image bytes (curl -T img.png)")
    if payload is None:
        raise ClientError("empty request body: send the image bytes")
    raise ClientError('JSON body must be {"data": "<base64-encoded image>"}')


def predictions_json(rows: list[dict], classifier: Classifier) -> list[str | ClientError]:
    """POST /predictions for a batch of request rows: per row, its answer {"label", "index", "probabilities",
    "model_version"} as the JSON text json.dumps writes for it, or its ClientError. The good images go through one
    forward pass, normalized as one batch (the same values as one image at a time)."""
    pixels: list[np.ndarray] = []
    outcome: list[int | ClientError] = []  # per row: its row of the probabilities, or its error
    for row in rows:
        try:
            pixels.append(image_pixels(image_bytes_of_row(row), classifier))
            outcome.append(len(pixels) - 1)
        except ClientError as error:
            outcome.append(error)
    if not pixels:
        return outcome
    answers = results_json(probabilities_of_pixels(pixels, classifier), classifier.spec.class_names,
                           model_version(classifier.spec))
    return [entry if isinstance(entry, ClientError) else answers[entry] for entry in outcome]


def model_version(spec) -> str | None:
    """The version an answer names: the archive's (the spec inside it carries it), as the protocol's string."""
    return None if spec.version is None else str(spec.version)


def model_batch(inputs: list[oip.Tensor], classifier: Classifier) -> np.ndarray:
    """The Open Inference Protocol request's decoded input tensors -> what the model takes: float32 (N, C, H, W),
    normalized. Encoded images (`image`) are decoded like those of /predictions (a bad one fails the request
    with a ClientError naming its position); normalized tensors (`input`) go to the model as they are."""
    model_input = oip.model_input(inputs, classifier.spec)
    if not isinstance(model_input, list):
        return model_input
    pixels = []
    for position, image in enumerate(model_input):
        try:
            pixels.append(image_pixels(image, classifier))
        except ClientError as error:
            raise ClientError(f"image {position}: {error}", error.status) from None
    return normalized_batch(pixels, classifier)


def output_tensors(logits: np.ndarray, requested: list[str] | None, classifier: Classifier) -> list[oip.Tensor]:
    """The model's logits for one request -> the output tensors it requests (None: all), in the order requested."""
    return oip.model_outputs(softmax(logits), classifier.spec.class_names, requested)


def infer_tensors(inputs: list[oip.Tensor], requested: list[str] | None, classifier: Classifier) -> list[oip.Tensor]:
    """The Open Inference Protocol's step in one forward pass: decoded input tensors and the names of the
    outputs requested -> the output tensors. (The KServe path runs the same two halves with its batcher
    between them: model_batch, then the pass, then output_tensors.)"""
    return output_tensors(classifier.infer(model_batch(inputs, classifier)), requested, classifier)


def classifier_metadata(classifier: Classifier) -> dict:
    """The model's metadata for clients: class names, input shape and normalization (the spec), pixel limit."""
    return {"format": "image-classifier-metadata/1", "spec": classifier.spec.to_dict(),
            "max_pixels": classifier.max_pixels}
