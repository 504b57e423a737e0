"""The kit's KServe ModelServer (what `make serve-kserve` runs) serving both archives of the session's
tiny Fashion-MNIST model, driven by NVIDIA's tritonclient over HTTP (binary tensor extension and
plain JSON) and gRPC: health, metadata, several images per request as BYTES and as FP32 tensors,
equal to in-process eager results, requested outputs, and bad input answered 400 / INVALID_ARGUMENT
while the server keeps answering."""

from __future__ import annotations

import base64
import json
import socket

import harness
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from served import BAD_INPUTS, ZERO_WIDTH_PNG
from tritonclient.utils import InferenceServerException

from handlers.store import served as served_archives

pytestmark = pytest.mark.integration
MODELS = ("fmnist", "fmnist-torchscript")
PLATFORMS = {"fmnist": "onnx_onnxv1", "fmnist-torchscript": "pytorch_torchscript"}
PROTOCOLS = ("http-binary", "http-json", "grpc")


@pytest.fixture(scope="module")
def kserve(exported, tmp_path_factory):
    """As `make serve-kserve` runs it: 2 REST processes (each loads the archives), gRPC in the first."""
    _, model_store = exported
    server = harness.start_kserve(model_store, tmp_path_factory.mktemp("kserve"), list(MODELS),
                                  extra_args=("--workers", "2"))
    yield server
    server.stop()


def client(server, protocol: str):
    if protocol == "grpc":
        return triton_grpc.InferenceServerClient(server.grpc)
    return triton_http.InferenceServerClient(server.http.removeprefix("http://"))


def triton_input(protocol: str, name: str, datatype: str, array: np.ndarray):
    module = triton_grpc if protocol == "grpc" else triton_http
    tensor = module.InferInput(name, list(array.shape), datatype)
    if protocol == "grpc":
        tensor.set_data_from_numpy(array)
    else:
        tensor.set_data_from_numpy(array, binary_data=protocol == "http-binary")
    return tensor


def image_input(protocol: str, pngs: list[bytes]):
    if protocol == "http-json":  # JSON carries BYTES as text: images go base64-encoded
        return triton_input(protocol, "image", "BYTES", np.array([base64.b64encode(p).decode() for p in pngs],
                                                                 dtype=object))
    return triton_input(protocol, "image", "BYTES", np.array(pngs, dtype=object))


def requested(protocol: str, *names: str) -> list:
    if protocol == "grpc":
        return [triton_grpc.InferRequestedOutput(name) for name in names]
    return [triton_http.InferRequestedOutput(name, binary_data=protocol == "http-binary") for name in names]


def labels(result) -> list[str]:
    return [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]


def assert_equal_in_process(result, expected: np.ndarray, class_names: list[str]) -> None:
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == expected.shape
    assert np.abs(probabilities - expected).max() <= 1e-4
    assert np.abs(probabilities.sum(axis=1) - 1).max() <= 1e-5
    assert labels(result) == [class_names[i] for i in expected.argmax(axis=1)]


@pytest.mark.parametrize("protocol", ("http", "grpc"))
def test_health_readiness_and_models(kserve, exported, protocol):
    triton = client(kserve, "grpc" if protocol == "grpc" else "http-binary")
    assert triton.is_server_live() and triton.is_server_ready()
    assert all(triton.is_model_ready(model) for model in MODELS)
    if protocol == "http":
        assert not triton.is_model_ready("no-such-model")
        status, body, _ = harness.http("GET", f"{kserve.http}/v2/models")
        every_archive = sorted(served_archives(exported[1]))  # with -int8 where export's gate passed
        assert status == 200 and sorted(json.loads(body)["models"]) == every_archive
    else:
        with pytest.raises(InferenceServerException, match="NOT_FOUND"):
            triton.is_model_ready("no-such-model")


@pytest.mark.parametrize("protocol", ("http", "grpc"))
@pytest.mark.parametrize("model", MODELS)
def test_metadata_lists_inputs_outputs_and_platform(kserve, served_images, protocol, model):
    if protocol == "grpc":
        metadata = triton_grpc.InferenceServerClient(kserve.grpc).get_model_metadata(model, as_json=True)
        shapes = lambda tensors: {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in tensors}  # noqa: E731
    else:
        metadata = triton_http.InferenceServerClient(kserve.http.removeprefix("http://")).get_model_metadata(model)
        assert metadata["versions"] == ["1"]  # the archive's version
        shapes = lambda tensors: {t["name"]: (t["datatype"], t["shape"]) for t in tensors}  # noqa: E731
    assert metadata["name"] == model and metadata["platform"] == PLATFORMS[model]
    assert shapes(metadata["inputs"]) == {"image": ("BYTES", [-1]), "input": ("FP32", [-1, 1, 28, 28])}
    classes = len(served_images[2])
    assert shapes(metadata["outputs"]) == {"probabilities": ("FP32", [-1, classes]), "label": ("BYTES", [-1])}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
def test_several_images_per_request_equal_in_process_eager(kserve, served_images, protocol, model):
    pngs, probabilities, class_names = served_images
    triton = client(kserve, protocol)
    for start in (0, 8, 16):  # 24 images, 8 per request
        result = triton.infer(model, [image_input(protocol, pngs[start:start + 8])],
                              outputs=requested(protocol, "probabilities", "label"))
        assert_equal_in_process(result, probabilities[start:start + 8], class_names)
    parameters = result.get_output("probabilities")["parameters"] if protocol != "grpc" else \
        {k: v.string_param for k, v in result.get_output("probabilities").parameters.items()}
    assert json.loads(parameters["class_names"]) == class_names


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
def test_normalized_tensors_equal_in_process_eager(kserve, served_images, served_inputs, protocol, model):
    _, probabilities, class_names = served_images
    result = client(kserve, protocol).infer(model, [triton_input(protocol, "input", "FP32", served_inputs[:12])])
    assert_equal_in_process(result, probabilities[:12], class_names)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requested_outputs_are_honoured(kserve, served_images, protocol):
    pngs, probabilities, class_names = served_images
    triton = client(kserve, protocol)
    result = triton.infer("fmnist", [image_input(protocol, pngs[:3])], outputs=requested(protocol, "label"))
    names = [o.name for o in result.get_response().outputs] if protocol == "grpc" else \
        [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["label"] and labels(result) == [class_names[i] for i in probabilities[:3].argmax(axis=1)]
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        triton.infer("fmnist", [image_input(protocol, pngs[:1])], outputs=requested(protocol, "logits"))


def bad_requests(pngs: list[bytes], inputs: np.ndarray) -> dict:
    """name -> (input name, datatype, data, what the message says)."""
    return {
        "bad image among good ones": ("image", "BYTES", np.array([pngs[0], b"%PDF-1.4 not an image", pngs[1]],
                                                                 dtype=object), "image 1: not an image"),
        "truncated image": ("image", "BYTES", np.array([BAD_INPUTS["truncated image"][0]], dtype=object),
                            "image 0: truncated or corrupt"),
        "zero-sized image": ("image", "BYTES", np.array([ZERO_WIDTH_PNG], dtype=object), "image 0: "),
        "images as FP32": ("image", "FP32", inputs[:1], "'image' must be BYTES, not FP32"),
        "tensor as FP64": ("input", "FP64", inputs[:1].astype(np.float64), "'input' must be FP32, not FP64"),
        "tensor of another size": ("input", "FP32", np.zeros((2, 1, 32, 32), np.float32),
                                   "must have shape [N, 1, 28, 28], not [2, 1, 32, 32]"),
        "tensor without a batch": ("input", "FP32", inputs[0], "must have shape [N, C, H, W]"),
        "unknown input name": ("pixels", "FP32", inputs[:1], "unknown input 'pixels'"),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_input_is_a_client_error_and_the_server_keeps_answering(kserve, served_images, served_inputs, protocol):
    pngs, probabilities, class_names = served_images
    triton = client(kserve, protocol)
    for case, (name, datatype, data, message) in bad_requests(pngs, served_inputs).items():
        if datatype == "BYTES" and protocol == "http-json":
            data = np.array([base64.b64encode(item).decode() for item in data], dtype=object)
        with pytest.raises(InferenceServerException) as error:
            triton.infer("fmnist", [triton_input(protocol, name, datatype, data)])
        expected_status = "StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"
        assert error.value.status() == expected_status, (case, error.value)
        assert message in error.value.message(), (case, error.value.message())
        result = triton.infer("fmnist", [image_input(protocol, pngs[:2])])
        assert_equal_in_process(result, probabilities[:2], class_names)


def test_malformed_http_bodies_get_400_with_a_message(kserve):
    url = f"{kserve.http}/v2/models/fmnist/infer"
    cases = [(b"{not json", {"Content-Type": "application/json"}),
             (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]}',
              {"Content-Type": "application/json"}),
             (b'{"inputs": []}garbage', {"Inference-Header-Content-Length": "14"}),
             (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
              b'"parameters": {"binary_data_size": 40}}]}\x05\x00\x00\x00abc',
              {"Inference-Header-Content-Length": "95"})]
    for body, headers in cases:
        status, answer, _ = harness.http("POST", url, body, headers)
        assert 400 <= status < 500 and json.loads(answer)["error"], (body, status, answer)
    assert harness.http("GET", f"{kserve.http}/v2/health/ready")[0] == 200


def test_a_body_over_the_limit_gets_413(kserve):
    """The direct infer route keeps at most MAX_BODY_BYTES (256 MB) of a body, then answers 413 (uvicorn
    discards the rest) and serves on."""
    port = int(kserve.http.rsplit(":", 1)[1])
    declared = 300 * 2**20
    chunk = b"0" * 2**20
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"POST /v2/models/fmnist/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % declared)
        sent = 0
        try:
            while sent < declared:
                connection.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server may close while the rest is on its way
            pass
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'{"error": "the request body is larger than 256 MB"}' in answer
    assert harness.http("GET", f"{kserve.http}/v2/health/ready")[0] == 200


def test_listens_on_loopback_only(kserve):
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # a documentation address: no packet is sent, it only picks a route
        address = probe.getsockname()[0]
    except OSError:
        address = None
    finally:
        probe.close()
    if address is None or address.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    for url in (kserve.http, "http://" + kserve.grpc):
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def test_the_probes_of_the_kubernetes_manifest_answer(kserve):
    """deploy/kserve/kit-modelserver.yaml's readiness and liveness paths, on the same server."""
    import yaml
    from helpers import ROOT

    container = yaml.safe_load((ROOT / "deploy" / "kserve" / "kit-modelserver.yaml").read_text())[
        "spec"]["predictor"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert harness.http("GET", kserve.http + container[probe]["httpGet"]["path"])[0] == 200


def test_the_container_health_check_of_the_kserve_service(kserve):
    """docker/healthcheck.py --oip: healthy with every model ready; unhealthy with nothing listening."""
    import subprocess
    import sys

    from helpers import ROOT

    def healthcheck(url: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), "--oip", url],
                              capture_output=True, text=True, timeout=60)

    result = healthcheck(kserve.http)
    assert result.returncode == 0 and result.stdout.strip() == "healthy", result.stdout + result.stderr
    result = healthcheck(f"http://127.0.0.1:{harness.free_ports(1)[0]}")
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: http://127.0.0.1:"), result.stdout


def test_one_process_as_kserve_runs_it_on_kubernetes(exported, served_images, tmp_path):
    """KServe's default, --workers 1 (deploy/kserve/kit-modelserver.yaml): one process serves REST and gRPC;
    Ctrl-C (SIGINT) ends it, as with 2 processes (tests/integration/test_make_serve_kserve.py)."""
    _, model_store = exported
    pngs, probabilities, class_names = served_images
    server = harness.start_kserve(model_store, tmp_path, ["fmnist"])
    try:
        for protocol in PROTOCOLS:
            result = client(server, protocol).infer("fmnist", [image_input(protocol, pngs[:4])])
            assert_equal_in_process(result, probabilities[:4], class_names)
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_concurrent_requests_are_batched_each_with_its_own_answer_or_error(kserve, served_images):
    """32 clients at once, every fourth request an image that is not one: the batcher gathers the good
    requests into shared forward passes, yet each answers as in-process eager, and each bad one gets its
    own 400 (the requests around it are unaffected)."""
    from concurrent.futures import ThreadPoolExecutor

    pngs, probabilities, class_names = served_images

    def one(index: int):
        triton = client(kserve, "http-binary")
        image = b"not an image" if index % 4 == 3 else pngs[index % len(pngs)]
        try:
            return index, triton.infer("fmnist", [image_input("http-binary", [image])],
                                       outputs=requested("http-binary", "probabilities", "label"))
        except InferenceServerException as error:
            return index, error

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(256)))
    for index, result in results:
        if index % 4 == 3:
            assert isinstance(result, InferenceServerException) and "image 0: not an image" in result.message()
            assert result.status() == "400"
        else:
            assert not isinstance(result, InferenceServerException), result
            assert_equal_in_process(result, probabilities[index % len(pngs)][None], class_names)


@pytest.mark.parametrize("log_requests", [False, True])
def test_each_process_logs_requests_only_when_asked(exported, served_images, tmp_path, log_requests):
    """KServe configures logging anew in each --workers process: without --log_requests none of them may
    write a line per request (it cost ~15 % of the throughput, and fills the disk); with it, they do."""
    _, model_store = exported
    pngs, _, _ = served_images
    extra = ("--workers", "2") + (("--log_requests", "true") if log_requests else ())
    server = harness.start_kserve(model_store, tmp_path, ["fmnist"], extra_args=extra)
    try:
        triton = client(server, "http-binary")
        for _ in range(20):
            triton.infer("fmnist", [image_input("http-binary", pngs[:1])])
    finally:
        server.stop()
    lines = [line for line in server.log_file.read_text(errors="replace").splitlines()
             if "POST /v2/models/fmnist/infer" in line]
    assert (len(lines) >= 20) if log_requests else not lines, lines[:3]
