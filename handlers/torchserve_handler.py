"""TorchServe entry point: a thin adapter over handlers.pipeline.

The archive holds this file (as the handler), the `handlers/` package, spec.json, the
serialized model and model-config.yaml, whose `handler:` section names the backend
explicitly (onnxruntime or torchscript). A bad image in a batch gets its own 4xx with a JSON
message; the other requests of the batch get their predictions; the worker keeps running.
`GET /models/<name>?customized=true` on the management API answers with the model's metadata
(`describe`: the spec and the pixel limit), which the demo page uses to show what the model sees.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from handlers.image import BadImage
from handlers.pipeline import Classifier, Settings, classify_batch_json, load_classifier

log = logging.getLogger(__name__)
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type"}


class ImageClassifierHandler:
    """TorchServe calls initialize(context) once per worker, then handle(batch, context)."""

    def __init__(self):
        self.classifier: Classifier | None = None  # set once by initialize, never changed after

    def initialize(self, context) -> None:
        properties = context.system_properties
        yaml_config = context.model_yaml_config or {}
        settings = Settings.from_yaml(yaml_config.get("handler", {}), context.manifest["model"]["serializedFile"])
        workers = int(yaml_config.get("minWorkers", 1))
        self.classifier = load_classifier(Path(properties["model_dir"]), settings, workers, properties.get("gpu_id"))
        log.info("loaded %s with %s on %s", context.model_name, settings.backend, self.classifier.device)

    def handle(self, data: list[dict], context) -> list:
        if context.get_request_header(0, "describe") == "True":  # TorchServe sends describe jobs alone
            return [describe(self.classifier)]
        # Answers as JSON text: TorchServe would otherwise encode each dict with json.dumps(indent=2),
        # in pure Python, which cost more than the model (same content, without the indentation).
        results = classify_batch_json(data, self.classifier)
        responses = []
        for index, result in enumerate(results):
            if isinstance(result, BadImage):
                context.set_response_status(result.status, PHRASES.get(result.status, "Bad Request"), index)
                context.set_response_content_type(index, "application/json")
                responses.append(json.dumps({"code": result.status, "error": str(result)}))
            else:
                responses.append(result)
        return responses


def describe(classifier: Classifier) -> dict:
    """The model's metadata for clients: class names, input shape and normalization (the spec)."""
    return {"format": "image-classifier-metadata/1", "spec": classifier.spec, "max_pixels": classifier.max_pixels}
