"""TorchServe entry point: the adapter between TorchServe's requests and the inference contract.

The archive holds this file (as the handler), the `handlers/` package, spec.json, the
serialized model and model-config.yaml, whose `handler:` section names the backend
explicitly (onnxruntime or torchscript). A bad image in a batch gets its own 4xx with a JSON
message; the other requests of the batch get their predictions; the worker keeps running.
`GET /models/<name>?customized=true` on the management API answers with the model's metadata
(`contract.classifier_metadata`: the spec and the pixel limit), which the demo page uses to show what the
model sees. Everything a request makes of the model is handlers/contract.py's; this module reads
TorchServe's rows and headers and sets its response statuses, types and headers.

`POST /v2/models/<name>/infer` (the Open Inference Protocol, see handlers/oip.py) reaches this handler
too, with its body untouched: TorchServe marks /predictions requests with a `url_path` header and
those of its other inference routes not, so a request without one is read as OIP (JSON, or JSON +
binary tensor data) and answered in kind, one forward pass per request, its N images together.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from handlers import contract, oip
from handlers.archive import HandlerSettings
from handlers.errors import ClientError
from handlers.pipeline import Classifier, load_classifier

log = logging.getLogger(__name__)
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type"}
CONTENT_TYPE_SPELLINGS = ("Content-Type", "content-type", "Content-type")  # header names arrive as sent
FORM_BODY = ClientError(
    "no image could be read from a body sent as an HTML form (Content-Type: application/x-www-form-urlencoded, "
    "what curl --data-binary sends without -H): send the image bytes, e.g. curl -T image.png URL, or curl -H "
    "'Content-Type: image/png' --data-binary @image.png URL", status=415)


class ImageClassifierHandler:
    """TorchServe calls initialize(context) once per worker, then handle(batch, context)."""

    def __init__(self):
        self.classifier: Classifier | None = None  # set once by initialize, never changed after

    def initialize(self, context) -> None:
        try:
            properties = context.system_properties
            yaml_config = context.model_yaml_config or {}
            settings = HandlerSettings.from_model_config(yaml_config, context.manifest["model"]["serializedFile"])
            workers = int(yaml_config.get("minWorkers", 1))
            self.classifier = load_classifier(Path(properties["model_dir"]), settings, workers,
                                              properties.get("gpu_id"))
        except Exception as error:  # TorchServe retries the worker; the health check says why it fails
            record_load_status(context.model_name, f"{type(error).__name__}: {error}")
            raise
        record_load_status(context.model_name, None)
        log.info("loaded %s with %s on %s", context.model_name, settings.backend, self.classifier.device)

    def handle(self, data: list[dict], context) -> list:
        if context.get_request_header(0, "describe") == "True":  # TorchServe sends describe jobs alone
            return [contract.classifier_metadata(self.classifier)]
        responses: list = [None] * len(data)
        predictions = [i for i in range(len(data)) if context.get_request_header(i, "url_path") is not None]
        forms = {i for i in predictions if sent_as_form(context, i)}
        # The kit's patched frontend (frontend-patch/) passes a form-typed body on as raw bytes, which
        # are answered like any other body. A stock TorchServe (KServe's runtime image) parses it as a
        # form first: then what reaches us is the image mangled into form fields, never used.
        mangled = {i for i in forms if not isinstance(data[i].get("body"), (bytes, bytearray))}
        # Answers as JSON text: TorchServe would otherwise encode each dict with json.dumps(indent=2),
        # in pure Python, which cost more than the model (same content, without the indentation).
        results = contract.predictions_json([{} if i in mangled else data[i] for i in predictions], self.classifier)
        for index, result in zip(predictions, results):
            if index in forms and isinstance(result, ClientError) and result.status == 400:
                result = FORM_BODY  # not an image: most likely curl --data-binary without -H; say what to send
            if isinstance(result, ClientError):
                context.set_response_status(result.status, PHRASES.get(result.status, "Bad Request"), index)
                context.set_response_content_type(index, "application/json")
                responses[index] = json.dumps({"code": result.status, "error": str(result)})
            else:
                responses[index] = result
        for index in range(len(data)):
            if responses[index] is None:
                responses[index] = self.answer_oip_request(data[index], context, index)
        return responses

    def answer_oip_request(self, row: dict, context, index: int) -> bytes:
        """One Open Inference Protocol request -> its answer (JSON, or JSON + binary data)."""
        headers = {key.lower(): value for key, value in context.get_all_request_header(index).items()}
        body = row.get("body", row.get("data"))
        version = context.manifest["model"]["modelVersion"]
        try:
            if not isinstance(body, (bytes, bytearray, dict)):
                raise ClientError("the body is not an inference request: send JSON (with Content-Type "
                                  "application/json or none), or JSON followed by binary tensor data")
            request = oip.decode_rest_request(body if isinstance(body, dict) else bytes(body),
                                              headers.get(oip.JSON_LENGTH_HEADER))
            requested = None if request.outputs is None else [name for name, _ in request.outputs]
            outputs = contract.infer_tensors(request.inputs, requested, self.classifier)
            answer, json_length = oip.encode_rest_response(context.model_name, version, request, outputs)
        except ClientError as error:
            context.set_response_status(error.status, PHRASES.get(error.status, "Bad Request"), index)
            context.set_response_content_type(index, "application/json")
            answer = {"error": str(error)}
            if context.get_request_header(index, "explain") is None:
                # Only TorchServe's own OIP gRPC service sends requests without this header (its REST
                # routes add it). It reads every answer as a response whatever the status, and a missing
                # field kills the worker; so the client gets an empty response and the log the message.
                log.warning("OIP gRPC request refused: %s", error)
                answer.update(id=str(body.get("id", "")) if isinstance(body, dict) else "",
                              model_name=context.model_name, model_version=version, outputs=[])
            return json.dumps(answer).encode()
        if json_length is None:
            context.set_response_content_type(index, "application/json")
        else:
            context.set_response_content_type(index, "application/octet-stream")
            context.set_response_header(index, "Inference-Header-Content-Length", str(json_length))
        return answer


def status_dir() -> Path:
    """Where workers record why a model failed to load, for docker/healthcheck.py (same default there)."""
    return Path(os.environ.get("KIT_STATUS_DIR") or tempfile.gettempdir()) / "image-classifier-kit"


def record_load_status(model_name: str, error: str | None) -> None:
    """Writes (atomically) or, after a successful load, removes <status_dir>/<model>.json."""
    path = status_dir() / f"{model_name}.json"
    try:
        if error is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"model": model_name, "error": error.splitlines()[0][:500] if error else "",
                                         "pid": os.getpid(), "time": time.time()}))
        temporary.replace(path)
    except OSError as problem:  # a read-only or full disk must not hide the real error
        log.warning("cannot record the load status of %s: %s", model_name, problem)


def sent_as_form(context, index: int) -> bool:
    for name in CONTENT_TYPE_SPELLINGS:
        value = context.get_request_header(index, name)
        if value is not None:
            return value.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
    return False

