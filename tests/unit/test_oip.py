"""handlers/oip.py: the model's Open Inference Protocol contract and the REST codec, checked against
NVIDIA's tritonclient (its own request encoder and response parser); the inference contract's OIP step
(handlers/contract.py); and the TorchServe handler's OIP path with a fake context."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import tritonclient.http as triton
from helpers import spec_for_tests
from test_handler import CLASSES, FakeContext, mean_pixel_classifier, png

from handlers import oip
from handlers.contract import infer_tensors, model_batch, predictions_json
from handlers.errors import ClientError
from handlers.pipeline import softmax
from handlers.torchserve_handler import ImageClassifierHandler

SPEC = spec_for_tests(CLASSES)


def images_tensor(*images, name="image") -> oip.Tensor:
    data = np.empty(len(images), dtype=object)
    data[:] = list(images)
    return oip.Tensor(name, "BYTES", data)


def triton_request(inputs, outputs=None, **kw) -> oip.Request:
    """A request as tritonclient.http encodes it, decoded by the kit's codec."""
    body, json_length = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return oip.decode_rest_request(body, None if json_length is None else str(json_length))


def triton_input(name, datatype, array, binary):
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


# ---------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("backend, platform", [("onnxruntime", "onnx_onnxv1"), ("torchscript", "pytorch_torchscript")])
def test_metadata_lists_both_inputs_and_outputs_with_a_variable_batch(backend, platform):
    metadata = oip.model_metadata("digits", "1.0", SPEC, backend)
    assert metadata == {"name": "digits", "versions": ["1.0"], "platform": platform,
                        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                                   {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                                    {"name": "label", "datatype": "BYTES", "shape": [-1]}]}


def test_images_come_as_raw_bytes_or_as_base64_text():
    images = oip.model_input([images_tensor(b"PNG-1", base64.b64encode(b"PNG-2").decode())], SPEC)
    assert images == [b"PNG-1", b"PNG-2"]


def test_tensors_come_as_a_float32_batch():
    batch = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    assert np.array_equal(oip.model_input([oip.Tensor("input", "FP32", batch)], SPEC), batch)


@pytest.mark.parametrize("inputs, status, message", [
    ([], 400, "send exactly one input"),
    ([images_tensor(b"a"), images_tensor(b"b")], 400, "send exactly one input"),
    ([images_tensor(b"a", name="images")], 400, "unknown input 'images'"),
    ([oip.Tensor("image", "FP32", np.zeros(2, np.float32))], 400, "'image' must be BYTES, not FP32"),
    ([oip.Tensor("image", "BYTES", np.array([[b"a"]], dtype=object))], 400, "must have shape [N], not [1, 1]"),
    ([images_tensor()], 400, "holds no image"),
    ([images_tensor(*[b"x"] * 257)], 413, "at most 256 per request"),
    ([images_tensor("not base64!")], 400, "image 0 is text but not base64"),
    ([oip.Tensor("input", "FP64", np.zeros((1, 1, 28, 28)))], 400, "'input' must be FP32, not FP64"),
    ([oip.Tensor("input", "FP32", np.zeros((1, 28, 28), np.float32))], 400, "must have shape [N, C, H, W]"),
    ([oip.Tensor("input", "FP32", np.zeros((1, 3, 28, 28), np.float32))], 400, "must have shape [N, 1, 28, 28]"),
    ([oip.Tensor("input", "FP32", np.full((1, 1, 28, 28), np.nan, np.float32))], 400, "NaN or infinite"),
])
def test_inputs_outside_the_contract_are_refused_with_a_message(inputs, status, message):
    with pytest.raises(ClientError) as error:
        oip.model_input(inputs, SPEC)
    assert error.value.status == status and message in str(error.value)


def test_outputs_come_as_requested_with_class_names():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    both = oip.model_outputs(probabilities, CLASSES, None)
    assert [t.name for t in both] == ["probabilities", "label"]
    assert both[0].data.dtype == np.float32 and np.allclose(both[0].data, probabilities)
    assert json.loads(both[0].parameters["class_names"]) == CLASSES
    assert list(both[1].data) == ["one", "zero"]
    assert [t.name for t in oip.model_outputs(probabilities, CLASSES, ["label"])] == ["label"]
    assert [t.name for t in oip.model_outputs(probabilities, CLASSES, ["label", "probabilities"])] == [
        "label", "probabilities"]
    with pytest.raises(ClientError, match="unknown output 'logits'"):
        oip.model_outputs(probabilities, CLASSES, ["logits"])
    with pytest.raises(ClientError, match="requested twice"):
        oip.model_outputs(probabilities, CLASSES, ["label", "label"])


# ---------------------------------------------------------------------------- the REST codec

@pytest.mark.parametrize("binary", [True, False])
def test_requests_encoded_by_tritonclient_decode_to_the_same_tensors(binary):
    pngs = [png(0), png(255, (30, 20)), b"\x00\xff raw"]
    images = np.array(pngs if binary else [base64.b64encode(p).decode() for p in pngs], dtype=object)
    request = triton_request([triton_input("image", "BYTES", images, binary)], request_id="r-7",
                             outputs=[triton.InferRequestedOutput("label", binary_data=binary)])
    assert request.id == "r-7" and request.outputs == [("label", binary)]
    assert oip.model_input(request.inputs, SPEC) == pngs
    batch = np.random.default_rng(1).normal(size=(2, 1, 28, 28)).astype(np.float32)
    request = triton_request([triton_input("input", "FP32", batch, binary)])
    assert request.outputs is None and request.binary_outputs  # tritonclient asks for binary when it names none
    assert np.array_equal(oip.model_input(request.inputs, SPEC), batch)


@pytest.mark.parametrize("binary", [(True, True), (False, False), (True, False)])
def test_responses_parse_in_tritonclient(binary):
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    outputs = oip.model_outputs(probabilities, CLASSES, None)
    request = oip.Request("id-1", [], [("probabilities", binary[0]), ("label", binary[1])], False)
    body, json_length = oip.encode_rest_response("digits", "1.0", request, outputs)
    assert (json_length is None) == (not any(binary))
    result = triton.InferenceServerClient.parse_response_body(body, header_length=json_length)
    assert np.array_equal(result.as_numpy("probabilities"), probabilities.astype(np.float32))
    assert [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")] == [
        "one", "zero"]
    response = result.get_response()
    assert response["id"] == "id-1" and response["model_name"] == "digits" and response["model_version"] == "1.0"
    assert json.loads(response["outputs"][0]["parameters"]["class_names"]) == CLASSES


def binary_request(header: dict, data: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + data, str(len(text))


@pytest.mark.parametrize("body, json_length, message", [
    (b"not json", None, "not an inference request"),
    (b'{"inputs": [', "3", "not an inference request"),
    (b"{}", None, '"inputs": [...]'),
    (b'{"inputs": {}}', None, '"inputs": [...]'),
    (b'{"inputs": []}', "x", "not a number"),
    (b'{"inputs": []}', "999", "does not fit"),
    (b'{"inputs": [7]}', None, "each input must be"),
    (b'{"inputs": [{"name": "input", "datatype": "FP31", "shape": [1], "data": [1]}]}', None, "unknown datatype"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1], "data": [1]}]}', None, "non-negative"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [1]}]}', None, "holds 2 elements"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": ["1"]}]}', None, "FP32 numbers"),
    (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [1]}]}', None, "must be strings"),
    (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1]}]}', None, 'neither "data"'),
    (b'{"inputs": [], "outputs": {"name": "label"}}', None, '"outputs" must be a list'),
    (b'{"inputs": [], "parameters": []}', None, "must be a JSON object"),
    (*binary_request({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1],
                                  "parameters": {"binary_data_size": 8}}]}, b"\x00" * 4), "exceeds the binary data"),
    (*binary_request({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1],
                                  "parameters": {"binary_data_size": 3}}]}, b"\x00" * 3), "whole number of FP32"),
    (*binary_request({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1],
                                  "parameters": {"binary_data_size": 4}}]}, b"\x00" * 6), "2 bytes of binary data"),
    (*binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 6}}]}, b"\x09\x00\x00\x00ab"), "runs past"),
    (*binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                  "parameters": {"binary_data_size": 2}}]}, b"\x09\x00"), "inside an element's length"),
])
def test_malformed_requests_are_refused_with_a_message(body, json_length, message):
    with pytest.raises(ClientError, match=None) as error:
        oip.decode_rest_request(body, json_length)
    assert message in str(error.value) and error.value.status == 400


def test_a_json_body_torchserve_already_parsed_decodes_too():
    request = oip.decode_rest_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                              "data": [base64.b64encode(b"PNG").decode()]}]}, None)
    assert oip.model_input(request.inputs, SPEC) == [b"PNG"]


# ---------------------------------------------------------------------------- the contract's OIP step

def probabilities_of_encoded_images(images, classifier):
    return softmax(classifier.infer(model_batch([images_tensor(*images)], classifier)))


def test_images_of_one_request_give_the_probabilities_of_predictions():
    classifier = mean_pixel_classifier()
    images = [png(0), png(255), png(128, (40, 40))]
    probabilities = probabilities_of_encoded_images(images, classifier)
    for row, answer in zip(probabilities, predictions_json([{"data": image} for image in images], classifier)):
        assert np.allclose(row, list(json.loads(answer)["probabilities"].values()), rtol=0, atol=1e-12)
    with pytest.raises(ClientError, match="image 1: not an image Pillow can read"):
        probabilities_of_encoded_images([png(0), b"junk"], classifier)
    batch = np.zeros((2, 1, 28, 28), np.float32)
    outputs = infer_tensors([oip.Tensor("input", "FP32", batch)], ["probabilities"], classifier)
    assert [t.name for t in outputs] == ["probabilities"] and outputs[0].data.shape == (2, 3)


def test_the_oip_step_answers_images_and_tensors_with_the_requested_outputs():
    classifier = mean_pixel_classifier()
    images = [png(0), png(255)]
    probabilities, label = infer_tensors([images_tensor(*images)], None, classifier)
    assert np.array_equal(probabilities.data, probabilities_of_encoded_images(images, classifier).astype(np.float32))
    assert list(label.data) == ["zero", "two"]
    assert json.loads(probabilities.parameters["class_names"]) == CLASSES
    with pytest.raises(ClientError, match="image 1: not an image Pillow can read") as error:
        infer_tensors([images_tensor(png(0), b"junk")], None, classifier)
    assert error.value.status == 400
    with pytest.raises(ClientError, match="unknown output 'logits'"):
        infer_tensors([images_tensor(png(0))], ["logits"], classifier)


# ---------------------------------------------------------------------------- the TorchServe handler

def test_handler_answers_predictions_and_oip_requests_of_one_batch(exported_tiny, tmp_path):
    out_dir, _ = exported_tiny
    for name in ("spec.json", "model.onnx"):
        shutil.copy(out_dir / name, tmp_path / name)
    spec = json.loads((tmp_path / "spec.json").read_text())
    context = FakeContext(tmp_path, {"minWorkers": 1, "handler": {"backend": "onnxruntime"}}, "model.onnx")
    handler = ImageClassifierHandler()
    handler.initialize(context)
    images = np.array([png(0), png(200), png(90, (50, 40))], dtype=object)
    binary_body, json_length = triton.InferenceServerClient.generate_request_body(
        [triton_input("image", "BYTES", images, True)], request_id="b")
    json_body = json.loads(triton.InferenceServerClient.generate_request_body(
        [triton_input("image", "BYTES", np.array([base64.b64encode(png(0)).decode()], dtype=object), False)],
        outputs=[triton.InferRequestedOutput("label", binary_data=False)])[0])
    oip_rest = {"explain": "False"}  # TorchServe's /v2/models/<name>/infer: no url_path
    context.headers = {1: {**oip_rest, "Inference-Header-Content-Length": str(json_length)}, 2: oip_rest,
                       3: oip_rest, 4: {}}  # 4: TorchServe's own OIP gRPC service sends no header at all
    responses = handler.handle([{"data": png(0)}, {"body": binary_body}, {"body": json_body},
                                {"body": b'{"inputs": []}'}, {"body": {"id": "g", "inputs": []}}], context)
    responses[0] = json.loads(responses[0])  # /predictions, as before: JSON text
    assert responses[0]["label"] in spec["class_names"]
    result = triton.InferenceServerClient.parse_response_body(
        responses[1], header_length=int(context.response_headers[1]["Inference-Header-Content-Length"]))
    assert result.get_response()["id"] == "b" and result.get_response()["model_name"] == "test"
    expected = np.array(list(responses[0]["probabilities"].values()), dtype=np.float32)
    assert np.allclose(result.as_numpy("probabilities")[0], expected, rtol=0, atol=1e-6)
    assert context.content_types[1] == "application/octet-stream"
    answer = json.loads(responses[2])
    assert [o["name"] for o in answer["outputs"]] == ["label"] and answer["outputs"][0]["data"] == [
        responses[0]["label"]]
    assert context.content_types[2] == "application/json" and 2 not in context.statuses
    assert context.statuses[3] == (400, "Bad Request")
    assert json.loads(responses[3]) == {"error": "send exactly one input, `image` (BYTES [N]: encoded images) or "
                                                 "`input` (FP32 [N, C, H, W]: normalized tensors); got 0"}
    assert json.loads(responses[4])["outputs"] == [] and json.loads(responses[4])["id"] == "g"
