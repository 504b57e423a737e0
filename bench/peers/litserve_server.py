"""LitServe with its batching: `LitAPI(max_batch_size, batch_timeout)`, `workers_per_device` inference
processes on the CPU and as many API server processes, ZeroMQ between them (`fast_queue=True`).

POST /predict: JSON {"data": "<base64 image>"} (LitServe hands decode_request parsed JSON or a form;
the kit takes the same JSON body). The answer: the kit's JSON object.
Run: python bench/peers/litserve_server.py PORT (settings from the environment: classifier.Settings).
No `from __future__ import annotations` here: LitServe reads decode_request's annotation at runtime.
"""

import base64
import json
import sys

import classifier
import litserve as ls
from fastapi import HTTPException


class ClassifierAPI(ls.LitAPI):
    def setup(self, device):
        self.classify = classifier.load()

    def decode_request(self, request):
        return base64.b64decode(request["data"])

    def predict(self, images):  # a list: LitServe's default batch() leaves the decoded requests as a list
        return self.classify(images)

    def encode_response(self, answer):
        status, text = answer
        if status != 200:
            raise HTTPException(status, json.loads(text)["error"])
        return json.loads(text)


if __name__ == "__main__":
    settings = classifier.Settings.from_environment()
    api = ClassifierAPI(max_batch_size=settings.max_batch, batch_timeout=settings.max_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=settings.workers, fast_queue=True)
    server.run(host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", generate_client_file=False,
               access_log=False)
