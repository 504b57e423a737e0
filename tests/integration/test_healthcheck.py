"""docker/healthcheck.py (the container's health check) against real TorchServe processes."""

from __future__ import annotations

import subprocess
import sys

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
