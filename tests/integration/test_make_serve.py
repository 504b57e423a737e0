"""`make serve`: TorchServe in the foreground on loopback; Ctrl-C stops it and all its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import harness
import pytest
from helpers import ROOT

pytestmark = pytest.mark.integration


def test_make_serve_answers_and_ctrl_c_stops_everything(exported, served_images, tmp_path):
    _, model_store = exported
    ports = harness.free_ports(5)
    # config.properties enables TS_* environment overrides: the same file, other ports.
    env = {**os.environ, "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{ports[0]}",
           "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports[1]}", "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports[2]}",
           "TS_GRPC_INFERENCE_PORT": str(ports[3]), "TS_GRPC_MANAGEMENT_PORT": str(ports[4]), "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(["make", "--no-print-directory", "serve", f"MODEL_STORE={model_store}"], cwd=ROOT,
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports[0]}"
    server: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                status = harness.predict(url, "fmnist", served_images[0][0], timeout=5)[0]
            except OSError:
                pass
            if status != 200:  # not up yet (refused), or workers still loading (503)
                time.sleep(0.5)
        assert status == 200
        server = harness.descendants(process.pid)  # shell, launcher, frontend JVM, four workers
        assert len(server) >= 6
        harness.stop_like_ctrl_c(process, server, f"{url}/ping")
    finally:
        for pid in harness.alive(harness.descendants(process.pid) | server):
            os.kill(pid, signal.SIGKILL)


def test_make_serve_without_archives_says_what_to_do(tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "serve", f"MODEL_STORE={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "run make train export first" in result.stderr
