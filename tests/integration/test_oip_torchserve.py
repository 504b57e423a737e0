"""The Open Inference Protocol on TorchServe 0.12.0 as far as it routes it (see the README): NVIDIA's
tritonclient.http against /v2/health/* and /v2/models/<name>/infer of the session's real TorchServe,
what TorchServe cannot serve (model metadata and readiness over REST, tritonclient.grpc), and
TorchServe's own OIP gRPC service, whose bad requests must not kill a worker."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import harness
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from test_oip_kserve import assert_equal_in_process, labels
from test_serving import worker_pids
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration
MODELS = ("fmnist", "fmnist-torchscript")


@pytest.fixture(scope="module")
def triton(server):
    return triton_http.InferenceServerClient(server.inference.removeprefix("http://"))


def grpc_port(server) -> int:
    config = (server.workdir / "config.properties").read_text().splitlines()
    return int(next(line for line in config if line.startswith("grpc_inference_port=")).split("=")[1])


def test_health_over_rest(triton):
    assert triton.is_server_live() and triton.is_server_ready()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", MODELS)
def test_several_images_per_request_equal_in_process_eager(triton, served_images, binary, model):
    pngs, probabilities, class_names = served_images
    images = pngs[:8] if binary else [base64.b64encode(p).decode() for p in pngs[:8]]
    image = triton_http.InferInput("image", [8], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    result = triton.infer(model, [image], outputs=outputs, request_id="ts-1")
    assert_equal_in_process(result, probabilities[:8], class_names)
    assert result.get_response()["id"] == "ts-1" and result.get_response()["model_name"] == model


@pytest.mark.parametrize("model", MODELS)
def test_normalized_tensors_and_requested_outputs(triton, served_images, served_inputs, model):
    _, probabilities, class_names = served_images
    tensor = triton_http.InferInput("input", [6, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(served_inputs[:6])
    result = triton.infer(model, [tensor])
    assert_equal_in_process(result, probabilities[:6], class_names)
    only_label = triton.infer(model, [tensor], outputs=[triton_http.InferRequestedOutput("label")])
    assert [o["name"] for o in only_label.get_response()["outputs"]] == ["label"]
    assert labels(only_label) == [class_names[i] for i in probabilities[:6].argmax(axis=1)]


def test_bad_input_is_400_and_the_workers_survive(server, triton, served_images):
    pngs, probabilities, class_names = served_images
    pids = worker_pids(server, "fmnist")
    image = triton_http.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([pngs[0], b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as error:
        triton.infer("fmnist", [image])
    assert error.value.status() == "400" and "image 1: not an image" in error.value.message()
    tensor = triton_http.InferInput("input", [1, 1, 28, 27], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 27), np.float32))
    with pytest.raises(InferenceServerException, match=r"must have shape \[N, 1, 28, 28\]"):
        triton.infer("fmnist", [tensor])
    assert worker_pids(server, "fmnist") == pids
    image.set_data_from_numpy(np.array(pngs[:2], dtype=object))
    assert_equal_in_process(triton.infer("fmnist", [image]), probabilities[:2], class_names)


def test_what_torchserve_does_not_serve(server, triton):
    """Documented in the README: no model metadata or readiness over REST, no standard gRPC service."""
    for path in ("/v2/models/fmnist", "/v2/models/fmnist/ready"):
        assert harness.http("GET", server.inference + path)[0] == 404
    assert harness.http("POST", server.inference + "/v2/models/fmnist/versions/1.0/infer", b"{}")[0] == 501
    status, body, _ = harness.http("GET", server.inference + "/v2")
    assert status == 200 and json.loads(body)["name"] == "Torchserve"
    with pytest.raises(InferenceServerException, match="404"):
        triton.get_model_metadata("fmnist")
    grpc_client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port(server)}")
    with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
        grpc_client.is_server_live()


@pytest.fixture(scope="module")
def torchserve_oip_stub(server, tmp_path_factory):
    """A client of TorchServe's own OIP gRPC service, compiled from the proto inside its jar."""
    import ts

    folder = tmp_path_factory.mktemp("torchserve-proto")
    jar = next((Path(ts.__file__).parent / "frontend").glob("model-server*.jar"))
    with zipfile.ZipFile(jar) as archive:
        (folder / "open_inference_grpc.proto").write_bytes(archive.read("proto/open_inference_grpc.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}", f"--python_out={folder}",
                    f"--grpc_python_out={folder}", "open_inference_grpc.proto"], check=True)
    sys.path.insert(0, str(folder))
    try:
        import grpc
        import open_inference_grpc_pb2 as messages
        import open_inference_grpc_pb2_grpc as services
    finally:
        sys.path.remove(str(folder))
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port(server)}")
    yield messages, services.GRPCInferenceServiceStub(channel)
    channel.close()


def test_torchserves_own_oip_grpc_service(server, torchserve_oip_stub, served_images):
    """It takes tensors in `contents` only (not raw_input_contents, which tritonclient sends), quotes
    BYTES outputs as JSON, and reads every answer as a success: a refused request gets an empty
    response, and the worker lives on."""
    messages, stub = torchserve_oip_stub
    pngs, probabilities, class_names = served_images
    pids = worker_pids(server, "fmnist")
    image = messages.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[2])
    image.contents.bytes_contents.extend(pngs[:2])
    answer = stub.ModelInfer(messages.ModelInferRequest(model_name="fmnist", id="g-1", inputs=[image]))
    outputs = {output.name: output for output in answer.outputs}
    served = np.array(outputs["probabilities"].contents.fp32_contents).reshape(2, -1)
    assert np.abs(served - probabilities[:2]).max() <= 1e-4
    expected = [class_names[i] for i in probabilities[:2].argmax(axis=1)]
    assert [label.decode() for label in outputs["label"].contents.bytes_contents] == [f'"{e}"' for e in expected]
    raw = messages.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    refused = stub.ModelInfer(messages.ModelInferRequest(model_name="fmnist", inputs=[raw],
                                                         raw_input_contents=[len(pngs[0]).to_bytes(4, "little")
                                                                             + pngs[0]]))
    assert list(refused.outputs) == []
    assert worker_pids(server, "fmnist") == pids
