"""Versions against a real TorchServe: rollout 1 -> 2 and rollback under load from 32 clients, the accuracy
gate, a broken archive, the versioned URL, and what is live after a restart (make serve)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import harness
import pytest
from helpers import ROOT, tiny_config
from rollout_load import CLIENTS, Load, recorded_samples

from handlers.archive import read_archive
from handlers.store import archive_path, read_live, served, write_live

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def versioned(tmp_path_factory):
    """A store with three versions of `tiny`: 1 (1 epoch), 2 (better: 2 epochs, more images), 3 (worse)."""
    from export.run import ExportConfig, export
    from training.run import train

    root = tmp_path_factory.mktemp("versions")
    artifacts, store = root / "artifacts", root / "model_store"
    for options in (dict(epochs=1), dict(epochs=2, train_limit=1200), dict(epochs=1, train_limit=64, lr=0.0005)):
        train(tiny_config(artifacts, **options))
        export(ExportConfig("tiny", artifacts, store))
    accuracy = {v: read_archive(p).release["test_accuracy"] for v, p in enumerate(
        (archive_path(store, "tiny", n) for n in (1, 2, 3)), start=1)}
    assert accuracy[2] >= accuracy[1] - 0.005 and accuracy[3] < accuracy[1] - 0.005, accuracy
    return store


def rollout(server, store, *args):
    return subprocess.run([sys.executable, "-m", "export.rollout", "--name", "tiny", "--model-store", str(store),
                           "--management", server.management, "--inference", server.inference, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def samples(store, version):
    return recorded_samples(archive_path(store, "tiny", version))


def test_rollout_and_rollback_under_load_answer_every_request(versioned, tmp_path):
    store = versioned
    expected = {str(v): [p for _, p in samples(store, v)] for v in (1, 2)}
    images = [png for png, _ in samples(store, 1)]
    assert images == [png for png, _ in samples(store, 2)]  # the same test images, recorded by both versions
    server = harness.start(store, tmp_path / "ts", ["tiny"], "load_models=tiny=tiny.v1.mar")
    try:
        with Load(server.inference, "tiny", images) as load:
            time.sleep(1)
            forward = rollout(server, store, "--version", "2")
            time.sleep(1)
            backward = rollout(server, store, "--rollback")
            time.sleep(1)
        assert forward.returncode == 0, forward.stderr
        assert backward.returncode == 0, backward.stderr
        steps = forward.stdout.splitlines()
        assert len(steps) == 8 and all(line.endswith("s)") for line in steps[:-1]), forward.stdout
        print(forward.stdout, backward.stdout, sep="\n")
        total = load.check(expected, "1", "2")
        print(f"{total} requests from {CLIENTS} clients during rollout and rollback, 0 failed")
        status, body, _ = harness.http("GET", f"{server.management}/models/tiny/all")
        assert status == 200 and [d["modelVersion"] for d in json.loads(body)] == ["1"]  # 2 is unregistered
        assert read_live(store)["tiny"] == {"live": 1, "previous": 2}
    finally:
        server.stop()


def test_the_gate_a_broken_archive_and_the_versioned_url(versioned, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for version in (1, 3):
        os.link(archive_path(versioned, "tiny", version), archive_path(store, "tiny", version))
    server = harness.start(store, tmp_path / "ts", ["tiny"], "load_models=tiny=tiny.v1.mar")
    try:
        png = samples(store, 1)[0][0]
        status, answer, _ = server.predict("tiny/1", png)
        assert status == 200 and answer["model_version"] == "1"
        assert server.predict("tiny/3", png)[0] == 404  # not registered

        refused = rollout(server, store, "--version", "3")
        assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "points below version 1" in refused.stderr and "FORCE=1" in refused.stderr

        broken = archive_path(store, "tiny", 4)
        broken.write_bytes(archive_path(store, "tiny", 1).read_bytes()[:5000])  # cut off in a copy
        refused = rollout(server, store, "--version", "4")
        assert refused.returncode != 0 and "not an archive of the kit" in refused.stderr, refused.stderr
        missing = rollout(server, store, "--version", "9")
        assert missing.returncode != 0 and "version 9 of tiny is not in" in missing.stderr
        other = subprocess.run([sys.executable, "-m", "export.rollout", "--name", "nope", "--model-store", str(store),
                                "--management", server.management], cwd=ROOT, capture_output=True, text=True)
        assert other.returncode != 0 and "does not serve a model named 'nope'" in other.stderr
        status, body, _ = harness.http("GET", f"{server.management}/models/tiny/all")
        assert [d["modelVersion"] for d in json.loads(body)] == ["1"]  # nothing changed
        assert server.predict("tiny", png)[1]["model_version"] == "1"

        forced = rollout(server, store, "--version", "3", "--force")
        assert forced.returncode == 0 and "forced past" in forced.stdout, forced.stderr
        assert server.predict("tiny", png)[1]["model_version"] == "3"
        assert server.predict("tiny/3", png)[1]["model_version"] == "3"
    finally:
        server.stop()
    down = rollout(server, store, "--version", "1")
    assert down.returncode != 0 and "no TorchServe answers at" in down.stderr and "make serve" in down.stderr


def test_make_serve_starts_with_the_live_version(versioned, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for version in (1, 2):
        os.link(archive_path(versioned, "tiny", version), archive_path(store, "tiny", version))
    assert served(store)["tiny"].name == "tiny.v2.mar"  # nothing rolled out: the newest
    write_live(store, "tiny", 1, 2)
    assert served(store)["tiny"].name == "tiny.v1.mar"
    ports = harness.free_ports(5)
    env = {**os.environ, "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports[0]}",
           "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports[1]}", "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports[2]}",
           "TS_GRPC_INFERENCE_PORT": str(ports[3]), "TS_GRPC_MANAGEMENT_PORT": str(ports[4]), "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(["make", "--no-print-directory", "serve", f"MODEL_STORE={store}"], cwd=ROOT,
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports[0]}"
    png = samples(store, 1)[0][0]
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and status != 200:
            try:
                status, answer, _ = harness.predict(url, "tiny", png, timeout=5)
            except OSError:
                pass
            if status != 200:
                time.sleep(0.5)
        assert status == 200 and answer["model_version"] == "1"
        listed = json.loads(harness.http("GET", f"http://127.0.0.1:{ports[1]}/models/tiny/all")[1])
        assert [d["modelVersion"] for d in listed] == ["1"]
    finally:
        harness.stop_like_ctrl_c(process, harness.descendants(process.pid), f"{url}/ping")


def test_the_management_socket_admits_the_kits_commands_only(versioned, tmp_path):
    """make serve's management API: a Unix socket in a 0700 directory. Rollout and the demo page's server reach
    it; no TCP port carries it; another user is refused."""
    import demo.server as demo
    from handlers import management

    store = tmp_path / "store"
    store.mkdir()
    for version in (1, 2):
        os.link(archive_path(versioned, "tiny", version), archive_path(store, "tiny", version))
    run = management.private_run_dir(tmp_path / "run")
    address = f"unix:{run / management.SOCKET_NAME}"
    server = harness.start(store, tmp_path / "ts", [], f"load_models=tiny=tiny.v1.mar\nmanagement_address={address}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (run / management.SOCKET_NAME).exists():
            time.sleep(0.2)
        assert oct(run.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(OSError):  # the TCP address the harness chose is not served: the socket replaced it
            harness.http("GET", f"{server.management}/models", timeout=3)
        moved = subprocess.run([sys.executable, "-m", "export.rollout", "--name", "tiny", "--model-store", str(store),
                                "--management", address, "--inference", server.inference],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert moved.returncode == 0, moved.stderr
        assert server.predict("tiny", samples(store, 2)[0][0])[1]["model_version"] == "2"

        page = demo.start("127.0.0.1", 0, server.inference, address)
        try:
            base = f"http://127.0.0.1:{page.server_address[1]}"
            config = json.loads(harness.http("GET", f"{base}/config.json")[1])
            assert config["management"] == f"{base}/management"
            status, body, _ = harness.http("GET", f"{base}/management/models")
            assert status == 200 and [m["modelName"] for m in json.loads(body)["models"]] == ["tiny"]
            assert harness.http("GET", f"{base}/management/models/tiny")[0] == 200
            assert harness.http("GET", f"{base}/management/models/tiny/2/set-default")[0] == 404  # read-only
        finally:
            demo.stop(page)

        if os.getuid() == 0:  # another user: refused by the directory's permissions
            check = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(run / 'management.sock')!r})")
            other = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", check],
                                   capture_output=True, text=True, timeout=60)
            assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr
    finally:
        server.stop()


def oip_infer(url: str, png: bytes) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(png).decode()]}]}).encode()
    status, answer, _ = harness.http("POST", url, body, {"Content-Type": "application/json"})
    return status, json.loads(answer)


@pytest.mark.parametrize("workers", ("1", "2"))
def test_kserve_serves_every_version_and_the_live_one(versioned, tmp_path, workers):
    """make serve-kserve: /v2/models/tiny/... is the live version, /v2/models/tiny/versions/<v>/... each version
    in the store (REST and gRPC), with the answers export recorded for that version."""
    import numpy as np
    import tritonclient.grpc as triton_grpc

    store = tmp_path / "store"
    store.mkdir()
    for version in (1, 2, 3):
        os.link(archive_path(versioned, "tiny", version), archive_path(store, "tiny", version))
    write_live(store, "tiny", 1, 3)
    server = harness.start_kserve(store, tmp_path / "kserve", ["tiny"], extra_args=("--workers", workers))
    try:
        base = f"{server.http}/v2/models/tiny"
        status, live = oip_infer(f"{base}/infer", samples(store, 1)[0][0])
        assert status == 200 and live["model_version"] == "1"
        for version in (1, 2, 3):
            for png, expected in samples(store, version)[:3]:
                status, answer = oip_infer(f"{base}/versions/{version}/infer", png)
                assert status == 200 and (answer["model_name"], answer["model_version"]) == ("tiny", str(version))
                probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")["data"]
                assert max(abs(a - b) for a, b in zip(probabilities, expected)) <= 1e-5
            status, body, _ = harness.http("GET", f"{base}/versions/{version}")
            assert status == 200 and json.loads(body)["versions"] == [str(version)]
            status, body, _ = harness.http("GET", f"{base}/versions/{version}/ready")
            assert status == 200 and json.loads(body) == {"name": "tiny", "ready": True}
        assert json.loads(harness.http("GET", f"{server.http}/v2/models")[1])["models"] == ["tiny"]
        missing = {"error": "model tiny has no version 9 here (its versions: 1, 2, 3)"}
        assert oip_infer(f"{base}/versions/9/infer", samples(store, 1)[0][0]) == (404, missing)
        for path in ("/versions/9", "/versions/9/ready"):
            status, body, _ = harness.http("GET", f"{base}{path}")
            assert status == 404 and json.loads(body) == missing, (path, body)

        client = triton_grpc.InferenceServerClient(server.grpc)
        png, expected = samples(store, 2)[0]
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([png], dtype=object))
        result = client.infer("tiny", [tensor], model_version="2")
        assert result.get_response().model_version == "2"
        assert np.abs(result.as_numpy("probabilities")[0] - np.array(expected)).max() <= 1e-5
        assert client.infer("tiny", [tensor]).get_response().model_version == "1"
        assert client.is_model_ready("tiny", "3") and client.get_model_metadata("tiny", "3").name == "tiny"
        with pytest.raises(Exception, match="has no version 9"):
            client.infer("tiny", [tensor], model_version="9")
    finally:
        server.stop()
