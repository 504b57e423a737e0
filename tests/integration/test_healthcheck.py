"""docker/healthcheck.py (the container's health check) against real TorchServe processes."""

from __future__ import annotations

import subprocess
import sys
import time

import harness
import pytest
from helpers import ROOT

pytestmark = pytest.mark.integration


def healthcheck(inference: str, management: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), "--inference", inference,
                           "--management", management], capture_output=True, text=True, timeout=60)


def test_healthy_when_every_model_has_a_ready_worker(server):
    result = healthcheck(server.inference, server.management)
    assert result.returncode == 0 and result.stdout.strip() == "healthy", result.stdout + result.stderr


def test_unhealthy_when_nothing_listens():
    inference, management = (f"http://127.0.0.1:{port}" for port in harness.free_ports(2))
    result = healthcheck(inference, management)
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: /ping failed"), result.stdout


def test_unhealthy_when_no_model_is_registered(tmp_path):
    """A server up with an empty model store answers /ping Healthy, but can serve nothing."""
    store = tmp_path / "empty-store"
    store.mkdir()
    empty = harness.start(store, tmp_path / "torchserve", models=[])
    try:
        result = healthcheck(empty.inference, empty.management)
    finally:
        empty.stop()
    assert result.returncode == 1 and "no model is registered" in result.stdout, result.stdout


def test_a_broken_archive_beside_a_good_one_is_named_with_why(exported, tmp_path, served_images):
    """The good model serves; the health check says which archive is not loaded (not a readable archive)
    and which model's workers fail to load (the error its handler recorded)."""
    import json
    import shutil
    import zipfile

    _, model_store = exported
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "fmnist.v1.mar", store)
    (store / "broken.mar").write_bytes(b"PK\x03\x04 this was cut off in the middle of a copy")
    with zipfile.ZipFile(model_store / "fmnist.v1.mar") as good, zipfile.ZipFile(store / "failing.mar", "w") as bad:
        for item in good.infolist():
            data = good.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelName"] = "failing"
                data = json.dumps(manifest).encode()
            elif item.filename == "model.onnx":
                data = b"not an ONNX model"
            bad.writestr(item, data)
    workdir = tmp_path / "torchserve"
    server = harness.start(store, workdir, ["fmnist"])
    try:
        status, body, _ = server.predict("fmnist", served_images[0][0], "image/png")
        assert status == 200 and body["label"] in served_images[2]
        status_file = workdir / "image-classifier-kit" / "failing.json"  # the workers' TMPDIR is the workdir
        deadline = time.monotonic() + 120
        while not status_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        result = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), "--inference",
                                 server.inference, "--management", server.management, "--model-store", str(store),
                                 "--status-dir", str(workdir / "image-classifier-kit")],
                                capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert result.returncode == 1, result.stdout
    line = result.stdout.strip()
    assert line.startswith("unhealthy: ") and "\n" not in line
    assert "broken.mar: not loaded: not a readable model archive (BadZipFile" in line, line
    assert "failing: no READY worker: loading failed: " in line and "ONNX" in line.split("failing:")[1], line
    assert "fmnist:" not in line.replace("fmnist.v1.mar", "")  # the good one is not named
