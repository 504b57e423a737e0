"""Data-parallel training for real: torchrun starting 2 gloo processes on the CPU, against one
process at the same global batch; a killed process, too many processes, mismatched options,
and a resumed distributed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import free_ports
from helpers import ROOT

from export.run import ExportConfig, export

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SMALL = ["--dataset", "mnist-5k", "--model", "simple-cnn", "--train-limit", "1200", "--batch-size", "64",
         "--workers", "0"]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(processes: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", f"--nproc_per_node={processes}", "-m", "training", *args],
                          cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout)


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=300)


def assert_torchrun_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The kit's one line; after it torchrun adds its own failure report (a ChildFailedError traceback
    of torchrun itself), but no traceback comes from the training processes."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.stderr[-3000:]
    for traceback in result.stderr.split("Traceback (most recent call last):")[1:]:
        assert traceback.lstrip().startswith(f'File "{TORCHRUN}"'), traceback[:500]


def test_two_processes_train_one_model_as_well_as_one_process(tmp_path):
    artifacts = tmp_path / "artifacts"
    common = [*SMALL, "--epochs", "3", "--artifacts-dir", str(artifacts)]
    two = torchrun(2, *common, "--name", "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = single(*common, "--name", "one")
    assert one.returncode == 0, one.stderr[-3000:]

    assert two.stdout.count("wrote ") == 1 and two.stdout.count("epoch   1/3") == 1  # process 0 speaks, once
    assert "on cpu x 2 processes" in two.stdout
    metrics = {name: json.loads((artifacts / name / "metrics.json").read_text()) for name in ("one", "two")}
    assert metrics["two"]["world_size"] == 2 and metrics["one"]["world_size"] == 1
    assert metrics["two"]["split_sizes"] == metrics["one"]["split_sizes"]  # whole splits, not shards
    assert abs(metrics["two"]["test_accuracy"] - metrics["one"]["test_accuracy"]) <= 0.015
    assert not list((artifacts / "two").glob(".*.tmp"))
    record = torch.load(artifacts / "two" / "checkpoint.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in record["state_dict"])  # the bare model
    report = export(ExportConfig("two", artifacts, tmp_path / "model_store"))
    assert report["passed"] and (tmp_path / "model_store" / "two.v1.mar").is_file()


def worker_pid(parent: int, rank: int) -> int | None:
    """The training process torchrun started for `rank` (found by its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == parent and f"RANK={rank}".encode() in environ and b"GROUP_RANK=0" in environ:
            return int(proc.name)
    return None


def start_torchrun(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "training", *args], cwd=ROOT,
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_line(process: subprocess.Popen, fragment: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if fragment in line:
            return
        assert time.monotonic() < deadline, f"no {fragment!r} within {timeout}s"
    raise AssertionError(f"torchrun ended before {fragment!r}: {process.stderr.read()[-3000:]}")


def test_a_killed_process_stops_the_other_with_a_clear_message_instead_of_hanging(tmp_path):
    process = start_torchrun([*SMALL, "--epochs", "200", "--name", "killed", "--artifacts-dir", str(tmp_path)])
    try:
        wait_for_line(process, "epoch   2/200")
        victim = worker_pid(process.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0 and time.monotonic() - started < 120
    assert "error: process 0 stopped: another process of this distributed run failed or was lost" in stderr
    assert "Traceback" not in stderr.split("error: process 0 stopped")[0][-2000:]
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] >= 2  # the last good epoch


def test_more_processes_than_cores_is_one_clear_error(tmp_path):
    processes = len(os.sched_getaffinity(0)) + 1
    result = torchrun(processes, *SMALL, "--artifacts-dir", str(tmp_path), timeout=180)
    assert_torchrun_error(result, f"{processes} processes per machine but", "CPU core(s)")
    assert not any(tmp_path.iterdir())


def test_processes_started_with_different_options_refuse_together(tmp_path):
    """Two machines' processes, as torchrun would start them, but one with another learning rate."""
    port = free_ports(1)[0]
    processes = []
    for rank, lr in ((0, "0.1"), (1, "0.05")):
        env = {**environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "training", *SMALL, "--lr", lr, "--artifacts-dir", str(tmp_path)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [2, 2]
    errors = [line for _, stderr in results for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: process 1 was started with --lr 0.05, process 0 with 0.1: start every process with "
                      "the same options"]
    assert not any(tmp_path.iterdir())


def test_an_interrupted_distributed_run_resumes_to_the_same_weights(tmp_path):
    common = [*SMALL, "--epochs", "6", "--artifacts-dir", str(tmp_path)]
    straight = torchrun(2, *common, "--name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    process = start_torchrun([*common, "--name", "resumed"])
    try:
        wait_for_line(process, "epoch   2/6")
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: torchrun passes it to both processes
        process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    last = tmp_path / "resumed" / "last.pt"
    assert 2 <= torch.load(last, weights_only=True)["epoch"] < 6
    resumed = torchrun(2, *common, "--name", "resumed", "--resume", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    weights = [torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["state_dict"]
               for name in ("straight", "resumed")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])

    other = torchrun(1, *common, "--name", "resumed", "--resume", str(last))
    assert_torchrun_error(other, "written by a run of 2 process(es), this run has 1")
