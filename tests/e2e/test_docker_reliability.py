"""The container never runs out of memory silently, and its health check names a broken archive.

Needs a Docker engine (see test_docker.py, whose engine fixture and compose project this module
shares; pytest runs the modules one after the other, each bringing its stack down at the end).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import harness
import pytest
from test_docker import compose, container_health, engine, readable_store, run  # noqa: F401  (engine: a fixture)

pytestmark = pytest.mark.docker


def store_of(model_store: Path, broken: bool) -> Path:
    store = readable_store(model_store)
    if broken:
        (store / "broken.mar").write_bytes(b"PK\x03\x04 cut off in the middle of a copy")
        (store / "broken.mar").chmod(0o644)
    return store


def stack_env(store: Path, **extra: str) -> dict:
    inference_port, metrics_port = harness.free_ports(2)
    return {**os.environ, "MODEL_STORE": str(store), "INFERENCE_PORT": str(inference_port),
            "METRICS_PORT": str(metrics_port), **extra}


def test_a_memory_limit_too_small_for_the_models_stops_with_one_line(engine, exported):  # noqa: F811
    store = store_of(exported[1], broken=False)
    env = stack_env(store, MEMORY_LIMIT="2g")
    try:
        compose("build", env=env)
        compose("up", "-d", env=env)
        deadline, logs = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "need about" not in logs:
            time.sleep(2)
            logs = compose("logs", "torchserve", env=env, check=False).stdout
        errors = [line.split("|", 1)[-1].strip() for line in logs.splitlines() if "error: " in line]
        assert errors and "need about" in errors[0] and "only 2,048 MB" in errors[0] and "MEMORY_LIMIT=" in errors[0]
        assert "org.pytorch.serve" not in logs  # TorchServe never started
        status, health, _ = container_health(env)
        assert health != "healthy"
    finally:
        compose("down", "-v", "--remove-orphans", env=env, check=False)
        shutil.rmtree(store, ignore_errors=True)


def test_the_health_check_names_a_broken_archive_beside_good_ones(engine, exported, served_images):  # noqa: F811
    store = store_of(exported[1], broken=True)
    env = stack_env(store)
    try:
        compose("build", env=env)
        compose("up", "-d", env=env)
        url = f"http://127.0.0.1:{env['INFERENCE_PORT']}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if harness.predict(url, "fmnist", served_images[0][0], "image/png")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert harness.predict(url, "fmnist", served_images[0][0], "image/png")[0] == 200  # the good one serves
        check = compose("exec", "-T", "torchserve", "python3", "/opt/kit/docker/healthcheck.py", env=env, check=False)
        assert check.returncode == 1
        assert "broken.mar: not loaded: not a readable model archive" in check.stdout, check.stdout
        time.sleep(15)  # a few health-check intervals
        _, health, container = container_health(env)
        state = run("docker", "inspect", "--format", "{{json .State.Health}}", container).stdout
        assert health == "unhealthy" or "broken.mar" in state, state
    finally:
        compose("down", "-v", "--remove-orphans", env=env, check=False)
        shutil.rmtree(store, ignore_errors=True)
