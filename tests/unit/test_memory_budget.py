"""docker/memory_budget.py: what the served models need, from the archives, against the container's limit."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "docker"))
import memory_budget as budget  # noqa: E402


@pytest.fixture
def store(exported_tiny, tmp_path):
    _, archives = exported_tiny
    store = tmp_path / "store"
    shutil.copytree(archives, store)
    return store


def test_the_need_follows_from_each_archives_workers_batch_size_pixel_limit_and_model(store):
    models, unreadable = budget.served_models(store)
    assert unreadable == [] and {m.archive for m in models} >= {"tiny.v1.mar", "tiny-torchscript.v1.mar"}
    for model in models:
        assert model.workers == 2 and model.batch_size == 16 and model.max_pixels == 24_000_000
        assert 10_000 < model.model_bytes < 50_000_000
    request = 10 * 2**20
    each = [m.workers * (budget.WORKER_MB + 3 * m.model_bytes / 2**20 + 4.2 * m.max_pixels / 2**20 + 12 + 16 * 10)
            for m in models]
    expected = budget.FRONTEND_MB + budget.SHARED_MB + sum(each) + max(each)  # + a rollout's second version
    assert budget.need_mb(models, request) == pytest.approx(expected)
    (store / "broken.mar").write_bytes(b"not a zip")
    assert budget.served_models(store)[1] == ["broken.mar"]  # left to the health check to name


def test_too_small_a_limit_stops_before_torchserve_with_one_line(store):
    config = ROOT / "config.properties"
    ok, message = budget.verdict(store, config, limit_mb=1024)
    assert not ok and message.startswith("error: ") and "\n" not in message
    assert "need about" in message and "MEMORY_LIMIT=" in message and "--workers 1" in message
    result = subprocess.run([sys.executable, str(ROOT / "docker" / "memory_budget.py"), "--model-store", str(store),
                             "--config", str(config), "--limit-mb", "1024", "--", "echo", "started"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3 and "started" not in result.stdout
    assert [line for line in result.stderr.splitlines() if line] == [message]


def test_a_limit_that_fits_starts_the_command(store):
    need = budget.need_mb(budget.served_models(store)[0], budget.max_request_size(ROOT / "config.properties"))
    result = subprocess.run([sys.executable, str(ROOT / "docker" / "memory_budget.py"), "--model-store", str(store),
                             "--config", str(ROOT / "config.properties"), "--limit-mb", str(need + 1), "--",
                             "echo", "started"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "started", result.stderr
    assert "within the limit" in result.stdout


def test_cgroup_limits_v2_v1_and_none(tmp_path):
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("3221225472\n")
    assert budget.memory_limit_mb((v2, v1)) == 3072
    v2.write_text("max\n")
    assert budget.memory_limit_mb((v2, v1)) is None
    v2.unlink()
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "no limit"
    assert budget.memory_limit_mb((v2, v1)) is None
    v1.write_text(str(5 * 2**30))
    assert budget.memory_limit_mb((v2, v1)) == 5120
    assert budget.memory_limit_mb((tmp_path / "absent",)) is None


def test_the_default_deployment_fits_the_compose_default():
    import re

    compose = (ROOT / "docker-compose.yml").read_text()
    limit_gb = int(re.search(r"memory: \$\{MEMORY_LIMIT:-(\d+)g\}", compose).group(1))
    default = [budget.ServedModel(f"m{i}.mar", 2, 16, 24_000_000, 400_000) for i in range(3)]  # make export's three
    assert budget.need_mb(default, budget.max_request_size(ROOT / "config.properties")) <= limit_gb * 1024
