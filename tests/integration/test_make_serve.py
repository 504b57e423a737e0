"""`make serve`: TorchServe in the foreground on loopback; Ctrl-C stops it and all its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import harness
import pytest
from helpers import ROOT

pytestmark = pytest.mark.integration


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children, grandchildren, ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are gone, only not yet reaped
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}


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
        server = descendants(process.pid)  # shell, launcher, frontend JVM, four workers
        assert len(server) >= 6
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert alive(server) == set()
        with pytest.raises(OSError):
            harness.http("GET", f"{url}/ping", timeout=2)
    finally:
        for pid in alive(descendants(process.pid) | server):
            os.kill(pid, signal.SIGKILL)


def test_make_serve_without_archives_says_what_to_do(tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "serve", f"MODEL_STORE={tmp_path}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "run make train export first" in result.stderr
