"""`make serve-kserve`: KServe's ModelServer in the foreground on loopback, every archive of the store
loaded; Ctrl-C stops it; mistakes (no archives, a port in use) get one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import harness
import pytest
import tritonclient.grpc as triton_grpc
from helpers import ROOT

from handlers.store import served as served_archives

pytestmark = pytest.mark.integration


def make_serve_kserve(model_store, http_port: int, grpc_port: int, **kw) -> subprocess.Popen:
    return subprocess.Popen(["make", "--no-print-directory", "serve-kserve", f"MODEL_STORE={model_store}",
                             f"KSERVE_HTTP_PORT={http_port}", f"KSERVE_GRPC_PORT={grpc_port}"], cwd=ROOT,
                            start_new_session=True, **kw)


def test_make_serve_kserve_serves_every_archive_and_ctrl_c_stops_it(exported, served_images, tmp_path):
    _, model_store = exported
    http_port, grpc_port = harness.free_ports(2)
    process = make_serve_kserve(model_store, http_port, grpc_port, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": str(tmp_path)})
    server = harness.KServe(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", tmp_path / "none")
    started: set[int] = set()
    try:
        server.wait_ready(["fmnist", "fmnist-torchscript"])
        status, body, _ = harness.http("GET", f"{server.http}/v2/models")
        assert status == 200 and sorted(json.loads(body)["models"]) == sorted(served_archives(model_store))
        assert triton_grpc.InferenceServerClient(server.grpc).is_server_ready()
        started = harness.descendants(process.pid)  # make and the server
        harness.stop_like_ctrl_c(process, started, f"{server.http}/v2/health/live")
    finally:
        for pid in harness.alive(harness.descendants(process.pid) | started):
            os.kill(pid, signal.SIGKILL)


def test_mistakes_get_one_line(exported, tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "serve-kserve", f"MODEL_STORE={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "run make train export first" in result.stderr
    _, model_store = exported
    http_port, grpc_port = harness.free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", http_port))
        taken.listen()
        result = subprocess.run(["make", "--no-print-directory", "serve-kserve", f"MODEL_STORE={model_store}",
                                 f"KSERVE_HTTP_PORT={http_port}", f"KSERVE_GRPC_PORT={grpc_port}"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: cannot listen on 127.0.0.1:{http_port} (Address already in use)" in result.stderr
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "handlers.kserve_model", "--model_store",
                             str(tmp_path), "--http_port", str(http_port), "--grpc_port", str(grpc_port)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {tmp_path}/broken.mar: not an archive of the kit (BadZipFile" in result.stderr
