"""BentoML with its adaptive batching: a batchable API (`max_batch_size`, `max_latency_ms`) on a service
of `workers` processes, access log off (BentoML logs every request by default).

POST /classify: JSON {"images": ["<base64 image>"]} (a batchable API takes a list, and BentoML joins the
lists of concurrent requests into one call); the answer: a list of the kit's JSON objects, one per image.
Run: bentoml serve bentoml_service:Classifier --host 127.0.0.1 --port PORT (from this folder; settings
from the environment: classifier.Settings).
"""

from __future__ import annotations

import base64
import json

import bentoml
import classifier

SETTINGS = classifier.Settings.from_environment()


@bentoml.service(workers=SETTINGS.workers, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        self.model = classifier.load(SETTINGS)

    # max_latency_ms is BentoML's bound on a request's whole time (beyond it, 503), not a wait:
    # the archive's responseTimeout.
    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch, max_latency_ms=round(SETTINGS.timeout_s * 1000))
    def classify(self, images: list[str]) -> list[dict]:
        answers = self.model([base64.b64decode(image) for image in images])
        return [json.loads(text) for _, text in answers]
