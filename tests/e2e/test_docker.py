"""`docker compose up` for real: build both images, serve the session's archives, check over HTTP; the
kserve profile's service (the KServe image: KServe's ModelServer) over the Open Inference Protocol.
Each image's size and each engine's memory at rest are printed (and the sizes checked).

Needs a Docker engine with Compose v2. Where none runs and this is root with apt (CI here), the
fixture prepares one with docker/prepare-offline.sh (the same script as `make docker-offline`)
and stops the dockerd it started at the end. Always ends with `docker compose down -v`.
KIT_E2E_PROJECT names the compose project (default kit-e2e) and IMAGE_TAG the images' tag
(default cpu, as docker-compose.yml), so that two checkouts can run this on one engine at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import pytest
from helpers import ROOT, minor_versions_behind, tiny_config
from rollout_load import CLIENTS, Load, recorded_samples
from served import BAD_INPUTS, assert_matches_eager, holds_an_invalid_escape
from tritonclient.utils import InferenceServerException

from handlers.archive import read_archive

pytestmark = pytest.mark.docker
PROJECT = os.environ.get("KIT_E2E_PROJECT", "kit-e2e")
MODELS = ("fmnist", "fmnist-torchscript")
PROFILE = ("--profile", "kserve")  # both services: torchserve and kserve
ENGINES = ("torchserve", "kserve")  # the compose services, the Dockerfile's targets, the images' names
MAX_IMAGE_BYTES = 1.3e9  # each engine's image (docs/deploy.md)


def image_name(service: str) -> str:
    return f"image-classifier-{service}:{os.environ.get('IMAGE_TAG', 'cpu')}"


def run(*command: str, env: dict | None = None, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def docker_ready() -> bool:
    return (shutil.which("docker") is not None and run("docker", "info", check=False).returncode == 0
            and run("docker", "compose", "version", check=False).returncode == 0)


def base_image_available() -> bool:
    if (ROOT / ".env").is_file():  # make docker-offline was run: its base image is named there
        return True
    default = "python:3.11-slim-bookworm"
    return (run("docker", "image", "inspect", default, check=False).returncode == 0
            or run("docker", "pull", default, check=False, timeout=120).returncode == 0)


@pytest.fixture(scope="module")
def engine():
    """A Docker engine with Compose v2 and a base image; a dockerd started here is stopped at the end."""
    pidfile = Path(tempfile.mkdtemp()) / "dockerd.pid"
    if not docker_ready() or not base_image_available():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("no Docker engine with Compose v2 and a base image, and not root with apt to prepare one")
        run("bash", "docker/prepare-offline.sh", env={**os.environ, "DOCKERD_PIDFILE": str(pidfile)}, timeout=900)
    yield
    if pidfile.is_file():
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(60):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.5)


def compose(*args: str, env: dict, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    return run("docker", "compose", "-p", PROJECT, *args, env=env, timeout=timeout, check=check)


def container_health(env: dict, service: str = "torchserve") -> tuple[str, str, str]:
    """(status, health, container id) of a service's container."""
    container = compose(*PROFILE, "ps", "-q", service, env=env).stdout.strip()
    state = json.loads(run("docker", "inspect", container).stdout)[0]["State"]
    return state["Status"], state.get("Health", {}).get("Status", ""), container


def wait_until_answering(url: str, env: dict, probe: bytes, timeout: float = 120) -> float:
    """Seconds until the container is healthy. From that moment every model must answer at once:
    the health check (docker/healthcheck.py) waits for READY workers, not just for /ping."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status, health, _ = container_health(env)
        if status == "running" and health == "healthy":
            try:
                answers = {model: harness.predict(url, model, probe, "image/png")[0] for model in MODELS}
            except OSError:  # a container that is being restarted can still show its old health
                answers = None
            if answers is not None:
                assert set(answers.values()) == {200}, f"healthy, yet the models answered {answers}"
                return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(compose("logs", "--tail", "80", env=env, check=False).stdout)


def wait_until_healthy(env: dict, service: str, timeout: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if container_health(env, service)[:2] == ("running", "healthy"):
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(compose(*PROFILE, "logs", "--tail", "80", service, env=env, check=False).stdout)


def readable_store(model_store: Path) -> Path:
    """A copy of the store's archives that the container's user (not root) can read."""
    store = Path(tempfile.mkdtemp(prefix="kit-e2e-store-"))
    store.chmod(0o755)
    for archive in model_store.glob("*.mar"):
        shutil.copy(archive, store / archive.name)
        (store / archive.name).chmod(0o644)
    return store


def image_bytes(service: str) -> int:
    return json.loads(run("docker", "image", "inspect", image_name(service)).stdout)[0]["Size"]


def kilobytes(status_file: Path, field: str) -> int | None:
    """A field of /proc/PID/smaps_rollup in kB, or None where it cannot be read (not root on the host)."""
    try:
        for line in status_file.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def processes_at_rest(env: dict, service: str) -> list[tuple[str, int, int | None]]:
    """(role, resident MB, proportional MB or None) of each process in a service's container. The
    proportional set size counts the libraries that processes share (torch, ONNX Runtime) once, split
    between them; the resident size counts them in full in every process."""
    _, _, container = container_health(env, service)
    listing = run("docker", "top", container, "-eo", "pid,rss,args").stdout.splitlines()[1:]
    rows = []
    for line in listing:
        pid, rss, args = line.split(None, 2)
        if "model_service_worker" in args:
            role = "TorchServe worker"
        elif args.startswith("java") or "/java " in args:
            role = "TorchServe frontend (JVM)"
        elif "multiprocessing" in args:  # --workers N: N REST processes, spawned
            role = "ModelServer REST process" if "spawn_main" in args else "multiprocessing helper"
        elif "handlers.kserve_model" in args:
            role = "ModelServer main process (gRPC)"
        else:
            role = args.split()[0].rsplit("/", 1)[-1]  # docker-init, the torchserve launcher, ...
        pss = kilobytes(Path(f"/proc/{pid}/smaps_rollup"), "Pss")
        rows.append((role, round(int(rss) / 1024), None if pss is None else round(pss / 1024)))
    return rows


def container_memory_mb(env: dict, service: str) -> float:
    """What the container's cgroup charges (docker stats: what its memory limit is compared with)."""
    _, _, container = container_health(env, service)
    stats = json.loads(run("docker", "stats", "--no-stream", "--format", "{{json .}}", container).stdout)
    used = stats["MemUsage"].split("/")[0].strip()
    number, unit = float(used.rstrip("KMGiB")), used.lstrip("0123456789.")
    return number * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "B": 1 / 2**20}[unit]


@pytest.fixture(scope="module")
def stack(engine, exported, served_images):
    """The compose stack built and up, serving the session's archives on free host ports."""
    store = readable_store(exported[1])
    inference_port, metrics_port, oip_http_port, oip_grpc_port = harness.free_ports(4)
    env = {**os.environ, "MODEL_STORE": str(store), "INFERENCE_PORT": str(inference_port),
           "METRICS_PORT": str(metrics_port), "OIP_HTTP_PORT": str(oip_http_port), "OIP_GRPC_PORT": str(oip_grpc_port)}
    try:
        build_started = time.monotonic()
        compose(*PROFILE, "build", env=env)
        build_seconds = time.monotonic() - build_started
        up_started = time.monotonic()
        compose(*PROFILE, "up", "-d", env=env)
        url = f"http://127.0.0.1:{inference_port}"
        wait_until_answering(url, env, served_images[0][0])
        seconds_to_healthy = time.monotonic() - up_started
        kserve_seconds = wait_until_healthy(env, "kserve") + seconds_to_healthy
        sizes = ", ".join(f"{image_name(service)} {image_bytes(service) / 1e9:.2f} GB" for service in ENGINES)
        print(f"\nimages built in {build_seconds:.0f} s: {sizes}; "
              f"docker compose up -> healthy in {seconds_to_healthy:.1f} s (kserve: at most {kserve_seconds:.1f} s)")
        yield {"env": env, "url": url, "metrics": f"http://127.0.0.1:{metrics_port}",
               "oip_http": f"127.0.0.1:{oip_http_port}", "oip_grpc": f"127.0.0.1:{oip_grpc_port}"}
    finally:
        compose(*PROFILE, "down", "-v", "--remove-orphans", env=env, check=False)
        shutil.rmtree(store, ignore_errors=True)


def test_the_workers_memory_at_rest_per_engine(stack):
    """Each engine's processes once every model is loaded and the service is healthy and idle (the first
    test of the module, before any load). TorchServe's container stays within what docker/memory_budget.py
    reserves for the same store."""
    env, report = stack["env"], []
    for service in ENGINES:
        rows = processes_at_rest(env, service)
        total = container_memory_mb(env, service)
        report.append(f"{service} ({image_name(service)}): container {total:,.0f} MiB (docker stats)")
        report += [f"  {role}: RSS {rss:,} MiB" + ("" if pss is None else f", PSS {pss:,} MiB")
                   for role, rss, pss in rows if rss >= 10]
        if service == "torchserve":
            budget = compose("exec", "-T", "torchserve", "python3", "/opt/kit/docker/memory_budget.py",
                             "--model-store", "/home/serve/model_store", "--limit-mb", "1e9", env=env).stdout
            need = float(re.search(r"need about ([\d,]+) MB", budget).group(1).replace(",", ""))
            report.append(f"  docker/memory_budget.py reserves {need:,.0f} MB for this store")
            assert total <= need, report
        assert any(role in ("TorchServe worker", "ModelServer REST process") for role, _, _ in rows), rows
    print("\nmemory at rest:\n" + "\n".join(report))


def test_each_image_is_small_and_holds_only_its_engine(stack):
    """An image per engine (docs/deploy.md): at most 1.3 GB each; both serve TorchScript (torch) and ONNX
    (ONNX Runtime) archives; no KServe in TorchServe's, no TorchServe and no Java in KServe's."""
    probe = ("import importlib.util as u, shutil; "
             "print(sorted(m for m in ('torch', 'onnxruntime', 'ts', 'kserve', 'fastapi', 'grpc', 'pandas') "
             "if u.find_spec(m)), bool(shutil.which('java')))")
    found = {}
    for service in ENGINES:
        assert image_bytes(service) <= MAX_IMAGE_BYTES, (image_name(service), image_bytes(service))
        found[service] = run("docker", "run", "--rm", "--network", "none", "--entrypoint", "python3",
                             image_name(service), "-c", probe).stdout.strip()
    assert found["torchserve"] == "['onnxruntime', 'torch', 'ts'] True", found
    assert found["kserve"] == "['fastapi', 'grpc', 'kserve', 'onnxruntime', 'pandas', 'torch'] False", found


@pytest.mark.parametrize("model", MODELS)
def test_container_predictions_match_in_process_eager(stack, served_images, model):
    pngs, probabilities, class_names = served_images
    for image, expected in zip(pngs[:12], probabilities):
        status, body, _ = harness.predict(stack["url"], model, image, "image/png")
        assert status == 200, body
        assert_matches_eager(body, expected, class_names)


@pytest.mark.parametrize("service", ENGINES)
def test_the_image_serves_the_torchscript_archive_written_by_training_torch(stack, exported, served_images, service):
    """The torch pin policy (docs/deploy.md): each image's torch is at most one minor version older than the
    torch that wrote the TorchScript archive, and TorchServe's loads and serves that archive as eager answers
    (KServe's: test_kserve_service_answers_standard_clients_as_in_process_eager)."""
    spec = read_archive(exported[1] / "fmnist-torchscript.v1.mar").spec
    served = compose(*PROFILE, "exec", "-T", service, "python3", "-c", "import torch; print(torch.__version__)",
                     env=stack["env"]).stdout.strip()
    assert minor_versions_behind(served, spec.torch_version) in (0, 1), (served, spec.torch_version)
    pngs, probabilities, class_names = served_images
    status, body, _ = harness.predict(stack["url"], "fmnist-torchscript", pngs[0], "image/png")
    assert status == 200, body
    assert_matches_eager(body, probabilities[0], class_names)


def test_container_answers_images_sent_as_forms_like_any_other(stack, served_images):
    """What `curl --data-binary @img.png` without -H sends: the image's frontend is patched (frontend-patch/)."""
    pngs, probabilities, class_names = served_images
    with_invalid_escapes = [i for i, image in enumerate(pngs) if holds_an_invalid_escape(image)]
    assert with_invalid_escapes  # what a stock TorchServe answers 500 (most of them)
    for index in with_invalid_escapes[:6]:
        status, body, _ = harness.predict(stack["url"], "fmnist", pngs[index], "application/x-www-form-urlencoded")
        assert status == 200, body
        assert_matches_eager(body, probabilities[index], class_names)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_container_answers_bad_input_with_4xx(stack, served_images, case):
    payload, content_type, expected_status, fragment = BAD_INPUTS[case]
    status, body, _ = harness.predict(stack["url"], "fmnist", payload, content_type)
    assert status == expected_status and fragment in body["error"], body


def test_runs_as_non_root_and_management_is_not_published(stack):
    env = stack["env"]
    assert compose("exec", "-T", "torchserve", "id", "-u", env=env).stdout.strip() != "0"
    _, _, container = container_health(env)
    listing = run("docker", "top", container, "-eo", "pid,uid,comm").stdout
    processes = [line.split() for line in listing.splitlines()[1:]]
    served = [uid for _, uid, command in processes if command in ("java", "python3", "torchserve")]
    assert served and "0" not in served  # the frontend and every worker run as the image's user
    published = compose("port", "torchserve", "8081", env=env, check=False)
    assert published.returncode != 0 or not published.stdout.strip()
    ip = json.loads(run("docker", "inspect", container).stdout)[0]["NetworkSettings"]["Networks"]
    container_ip = next(iter(ip.values()))["IPAddress"]
    with pytest.raises(OSError):  # not from the host, not even at the container's own address
        harness.http("GET", f"http://{container_ip}:8081/models", timeout=3)
    inside = compose("exec", "-T", "torchserve", "python3", "-c",
                     "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8081/models').status)", env=env)
    assert inside.stdout.strip() == "200"  # operators reach it with docker compose exec


def test_rollout_runs_inside_the_container_against_the_read_only_store(stack):
    """docker/rollout (docs/deploy.md): the management API on the container's loopback, the live record in the
    kit-state volume beside the read-only store."""
    env = stack["env"]
    missing = compose("exec", "-T", "torchserve", "rollout", "--name", "fmnist", "--version", "2", env=env,
                      check=False)
    assert missing.returncode != 0 and "version 2 of fmnist is not in /home/serve/model_store/" in missing.stderr
    same = compose("exec", "-T", "torchserve", "rollout", "--name", "fmnist", env=env)
    assert "version 1 of fmnist is already live" in same.stdout
    live = compose("exec", "-T", "torchserve", "cat", "/home/serve/state/live.json", env=env)
    assert json.loads(live.stdout)["fmnist"]["live"] == 1


def test_rollout_and_rollback_in_the_container_answer_every_request_under_load(stack, exported, tmp_path):
    """docs/versions.md in the container: a second version of fmnist put into the mounted store, rolled out and
    back with `docker compose exec torchserve rollout` while 32 clients send test images to the published port."""
    from export.run import ExportConfig, export
    from training.run import train

    env, store = stack["env"], Path(stack["env"]["MODEL_STORE"])
    scratch = tmp_path / "store"
    scratch.mkdir()
    shutil.copy(store / "fmnist.v1.mar", scratch)
    train(tiny_config(tmp_path / "artifacts", name="fmnist", dataset="fashion-mnist", model="fast-cnn",
                      train_limit=4000, batch_size=64, epochs=1))  # another model than version 1's
    export(ExportConfig("fmnist", tmp_path / "artifacts", scratch))
    shutil.copy(scratch / "fmnist.v2.mar", store)
    (store / "fmnist.v2.mar").chmod(0o644)
    expected = {str(v): [p for _, p in recorded_samples(store / f"fmnist.v{v}.mar")] for v in (1, 2)}
    images = [png for png, _ in recorded_samples(store / "fmnist.v1.mar")]
    try:
        with Load(stack["url"], "fmnist", images) as load:
            time.sleep(1)
            forward = compose("exec", "-T", "torchserve", "rollout", "--name", "fmnist", "--version", "2", env=env)
            time.sleep(1)
            backward = compose("exec", "-T", "torchserve", "rollout", "--name", "fmnist", "--rollback", env=env)
            time.sleep(1)
        print(forward.stdout, backward.stdout, sep="\n")
        total = load.check(expected, "1", "2")
        print(f"{total} requests from {CLIENTS} clients to the container during rollout and rollback, 0 failed")
        listed = compose("exec", "-T", "torchserve", "python3", "-c", "import urllib.request as u; "
                         "print(u.urlopen('http://127.0.0.1:8081/models/fmnist/all').read().decode())", env=env)
        assert [d["modelVersion"] for d in json.loads(listed.stdout)] == ["1"]  # version 2 is unregistered
        live = compose("exec", "-T", "torchserve", "cat", "/home/serve/state/live.json", env=env)
        assert json.loads(live.stdout)["fmnist"] == {"live": 1, "previous": 2}
    finally:
        (store / "fmnist.v2.mar").unlink(missing_ok=True)


def test_metrics_port_is_published(stack, served_images):
    assert harness.predict(stack["url"], "fmnist", served_images[0][0], "image/png")[0] == 200
    status, body, _ = harness.http("GET", f"{stack['metrics']}/metrics")
    assert status == 200 and b"ts_inference_requests_total" in body


def test_service_recovers_after_torchserve_is_killed(stack, served_images):
    env = stack["env"]
    _, _, container = container_health(env)
    processes = run("docker", "top", container, "-eo", "pid,comm").stdout.split("\n")[1:]
    java = [int(line.split()[0]) for line in processes if line.split()[1:] == ["java"]]
    assert len(java) == 1
    os.kill(java[0], signal.SIGKILL)  # the TorchServe frontend inside the container
    time.sleep(2)
    wait_until_answering(stack["url"], env, served_images[0][0])
    restarts = json.loads(run("docker", "inspect", container).stdout)[0]["RestartCount"]
    assert restarts >= 1
    pngs, probabilities, class_names = served_images
    status, body, _ = harness.predict(stack["url"], "fmnist", pngs[0], "image/png")
    assert status == 200
    assert_matches_eager(body, probabilities[0], class_names)


# ---------------------------------------------------------------------------- the Open Inference Protocol

@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", MODELS)
def test_kserve_service_answers_standard_clients_as_in_process_eager(stack, served_images, protocol, model):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    pngs, probabilities, class_names = served_images
    module = triton_grpc if protocol == "grpc" else triton_http
    client = module.InferenceServerClient(stack["oip_grpc"] if protocol == "grpc" else stack["oip_http"])
    assert client.is_server_ready() and client.is_model_ready(model)
    image = module.InferInput("image", [8], "BYTES")
    image.set_data_from_numpy(np.array(pngs[:8], dtype=object))
    result = client.infer(model, [image])
    served = result.as_numpy("probabilities")
    assert np.abs(served - probabilities[:8]).max() <= 1e-4
    assert [label.decode() for label in result.as_numpy("label")] == [
        class_names[i] for i in probabilities[:8].argmax(axis=1)]
    bad = module.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException, match="image 0: not an image"):
        client.infer(model, [bad])


def test_torchserve_service_answers_oip_over_rest(stack, served_images):
    import tritonclient.http as triton_http

    pngs, probabilities, class_names = served_images
    client = triton_http.InferenceServerClient(stack["url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    image = triton_http.InferInput("image", [4], "BYTES")
    image.set_data_from_numpy(np.array(pngs[:4], dtype=object))
    served = client.infer("fmnist", [image]).as_numpy("probabilities")
    assert np.abs(served - probabilities[:4]).max() <= 1e-4


def test_kserve_service_runs_as_non_root_and_publishes_only_its_inference_ports(stack):
    env = stack["env"]
    _, _, container = container_health(env, "kserve")
    listing = run("docker", "top", container, "-eo", "pid,uid,comm").stdout.splitlines()[1:]
    processes = [line.split()[1:] for line in listing]
    assert ["10001", "python3"] in [[uid, command] for uid, command in processes]  # the image's user
    assert all(uid != "0" for uid, _ in processes), processes
    published = json.loads(run("docker", "inspect", container).stdout)[0]["NetworkSettings"]["Ports"]
    assert sorted(port for port, bindings in published.items() if bindings) == ["8085/tcp", "8086/tcp"]
