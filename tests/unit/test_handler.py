"""handlers/: the pipeline's and the contract's plain functions, and the TorchServe adapter with a fake context."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import yaml
from helpers import spec_for_tests
from PIL import Image

from handlers.archive import HandlerSettings
from handlers.contract import image_bytes_of_row, predictions_json
from handlers.errors import ClientError
from handlers.pipeline import Classifier, results, softmax, threads_per_worker
from handlers.torchserve_handler import ImageClassifierHandler

CLASSES = ["zero", "one", "two"]


def png(value: int, size=(28, 28)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, "PNG")
    return buffer.getvalue()


def mean_pixel_classifier() -> Classifier:
    """A real Classifier whose "model" maps the mean input to logits: enough to test batching."""
    spec = spec_for_tests(CLASSES)

    def infer(batch: np.ndarray) -> np.ndarray:
        mean = batch.reshape(len(batch), -1).mean(axis=1)
        return np.stack([-mean, np.zeros_like(mean), mean], axis=1).astype(np.float32)

    return Classifier(spec, 10_000_000, infer, "cpu")


@pytest.mark.parametrize("request_row", [
    {"data": bytearray(b"IMG")},
    {"body": b"IMG"},
    {"file": b"IMG"},
    {"upload": bytearray(b"IMG")},  # multipart under another field name
    {"body": {"data": base64.b64encode(b"IMG").decode()}},
])
def test_a_request_row_gives_its_image_from_raw_multipart_and_json(request_row):
    assert image_bytes_of_row(request_row) == b"IMG"


@pytest.mark.parametrize("request_row, message", [
    ({"body": {"data": "***"}}, "not valid base64"),
    ({"body": {"image": "abc"}}, '{"data"'),
    ({"body": [1, 2]}, '{"data"'),
    ({"body": "plain text"}, "text"),
    ({}, "empty"),
])
def test_a_malformed_request_row_is_refused(request_row, message):
    with pytest.raises(ClientError, match=message):
        image_bytes_of_row(request_row)


def test_results_give_every_class_in_order_summing_to_one():
    answers = results(softmax(np.array([[1.0, 3.0, -2.0], [100.0, -100.0, 0.0]], dtype=np.float32)), CLASSES)
    assert [r["label"] for r in answers] == ["one", "zero"]
    for result in answers:
        assert list(result["probabilities"]) == CLASSES
        assert abs(sum(result["probabilities"].values()) - 1) <= 1e-9
        assert json.loads(json.dumps(result)) == result  # plain JSON types


def test_one_forward_pass_per_batch_and_a_bad_image_fails_only_itself():
    calls = []
    classifier = mean_pixel_classifier()
    counting = Classifier(**{**classifier.__dict__, "infer": lambda b: calls.append(len(b)) or classifier.infer(b)})
    rows = [{"data": png(0)}, {"data": b"garbage"}, {"data": png(255)}, {"body": {"data": "%%"}}, {"data": png(250)}]
    results = predictions_json(rows, counting)
    assert calls == [3]  # the three good images, in one forward pass
    assert [json.loads(r)["label"] if isinstance(r, str) else r.status for r in results] == [
        "zero", 400, "two", 400, "two"]


class FakeContext:
    """What TorchServe hands a handler: properties, manifest, yaml config, response status setters."""

    def __init__(self, model_dir, yaml_config, serialized_file):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.manifest = {"model": {"serializedFile": serialized_file, "modelVersion": "1.0"}}
        self.model_yaml_config = yaml_config
        self.model_name = "test"
        self.statuses, self.content_types = {}, {}
        self.request_headers = {}  # of request 0: TorchServe marks a describe request {"describe": "True"}
        self.headers = {}  # of other requests, by index (default: a /predictions request)
        self.response_headers = {}

    def get_all_request_header(self, idx):
        predictions = {"url_path": "", "explain": "False"}  # what TorchServe adds to a /predictions request
        return {**predictions, **self.request_headers} if idx == 0 else self.headers.get(idx, predictions)

    def get_request_header(self, idx, key):
        return self.get_all_request_header(idx).get(key)

    def set_response_status(self, code, phrase, idx):
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx, value):
        self.content_types[idx] = value

    def set_response_header(self, idx, key, value):
        self.response_headers.setdefault(idx, {})[key] = value


@pytest.mark.parametrize("backend, file_name", [("onnxruntime", "model.onnx"), ("torchscript", "model.torchscript.pt")])
def test_handler_with_a_fake_context(exported_tiny, tmp_path, backend, file_name):
    out_dir, _ = exported_tiny
    shutil.copy(out_dir / "spec.json", tmp_path / "spec.json")
    shutil.copy(out_dir / file_name, tmp_path / file_name)
    context = FakeContext(tmp_path, {"minWorkers": 2, "handler": {"backend": backend}}, file_name)
    handler = ImageClassifierHandler()
    handler.initialize(context)
    responses = handler.handle([{"data": png(0)}, {"body": b"not an image"}, {"data": png(200, (50, 40))}], context)
    assert all(isinstance(responses[i], str) for i in (0, 2))  # JSON text, so TorchServe does not re-encode it
    responses[0], responses[2] = json.loads(responses[0]), json.loads(responses[2])
    assert responses[0]["label"] in json.loads((tmp_path / "spec.json").read_text())["class_names"]
    assert context.statuses == {1: (400, "Bad Request")}
    assert context.content_types[1] == "application/json"
    assert json.loads(responses[1]) == {"code": 400, "error": "not an image Pillow can read (UnidentifiedImageError)"}
    assert len(responses[2]["probabilities"]) == 10
    context.request_headers = {"describe": "True"}  # GET /models/<name>?customized=true
    assert handler.handle([{}], context) == [{"format": "image-classifier-metadata/1",
                                              "spec": json.loads((tmp_path / "spec.json").read_text()),
                                              "max_pixels": 24_000_000}]


def test_a_form_typed_body_is_answered_when_it_is_an_image_and_refused_with_what_to_send_when_not(
        exported_tiny, tmp_path):
    """The kit's patched frontend passes a form-typed body on as raw bytes ("body"); a stock TorchServe
    hands over the image parsed as form fields, which are never used."""
    out_dir, _ = exported_tiny
    shutil.copy(out_dir / "spec.json", tmp_path / "spec.json")
    shutil.copy(out_dir / "model.onnx", tmp_path / "model.onnx")
    context = FakeContext(tmp_path, {"handler": {"backend": "onnxruntime"}}, "model.onnx")
    handler = ImageClassifierHandler()
    handler.initialize(context)
    form = {"url_path": "", "explain": "False", "Content-Type": "application/x-www-form-urlencoded"}
    context.headers = {i: form for i in range(4)}
    stock_parsed = {"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR": "mangled"}
    rows = [{"body": bytearray(png(0))}, stock_parsed, {"body": bytearray(b"name=value")},
            {"body": bytearray(png(0, (6000, 5000)))}]
    responses = handler.handle(rows, context)
    assert json.loads(responses[0])["label"] in json.loads((tmp_path / "spec.json").read_text())["class_names"]
    assert context.statuses == {1: (415, "Unsupported Media Type"), 2: (415, "Unsupported Media Type"),
                                3: (413, "Payload Too Large")}  # an image too large is still said so
    for refused in (1, 2):
        assert "curl -T image.png" in json.loads(responses[refused])["error"]


@pytest.mark.parametrize("section, message", [
    ({}, "handler.backend must be one of"),
    ({"backend": "tensorrt"}, "handler.backend must be one of"),
    ({"backend": "onnxruntime", "turbo": True}, "unknown handler setting"),
])
def test_settings_name_the_backend_explicitly(section, message):
    with pytest.raises(ValueError, match=message):
        HandlerSettings.from_model_config({"handler": section}, "model.onnx")


def test_threads_are_split_between_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert threads_per_worker(workers=2, threads=0) == 4
    assert threads_per_worker(workers=16, threads=0) == 1
    assert threads_per_worker(workers=2, threads=3) == 3


def test_archive_model_config_is_what_the_handler_reads():
    from export.archive import ServingConfig

    config = yaml.safe_load(yaml.safe_dump(ServingConfig().model_config("onnxruntime")))
    settings = HandlerSettings.from_model_config(config, "model.onnx")
    assert settings.backend == "onnxruntime" and settings.max_pixels == ServingConfig().max_pixels
    assert config["batchSize"] >= 1 and config["maxBatchDelay"] >= 0
