"""A real TorchServe process for tests and benchmarks: free loopback ports, private folders,
the project's config.properties with only the addresses changed, and a stop that always
cleans up (the whole process group: the frontend JVM and its Python workers)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHSERVE = ROOT / ".venv" / "bin" / "torchserve"
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def predict(inference_url: str, model: str, body: bytes, content_type: str = "application/octet-stream",
            **kw) -> tuple[int, dict | bytes, dict]:
    """POST /predictions/<model>: (status, JSON body or raw bytes, headers)."""
    status, payload, headers = http("POST", f"{inference_url}/predictions/{model}", body,
                                    {"Content-Type": content_type}, **kw)
    try:
        return status, json.loads(payload), headers
    except json.JSONDecodeError:
        return status, payload, headers


def wait_until_ready(is_ready: Callable[[], bool], process: subprocess.Popen, name: str, log: Callable[[], str],
                     timeout: float, interval: float) -> None:
    """Polls `is_ready` (a refused connection counts as not yet); a server that exits first or is not
    ready in time raises with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()}")
        try:
            if is_ready():
                return
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{name} was not ready after {timeout}s:\n{log()}")


@dataclass
class TorchServe:
    process: subprocess.Popen
    inference: str
    management: str
    metrics: str
    workdir: Path

    def log(self) -> str:
        logs = sorted((self.workdir / "logs").glob("*.log"))
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)

    def predict(self, model: str, body: bytes, content_type: str = "application/octet-stream", **kw):
        return predict(self.inference, model, body, content_type, **kw)

    def wait_ready(self, models: list[str], timeout: float = 120) -> None:
        """Until /ping is Healthy and every model has all its workers READY."""
        wait_until_ready(lambda: http("GET", f"{self.inference}/ping", timeout=2)[0] == 200 and all(
            self._workers_ready(model) for model in models), self.process, "TorchServe", self.log, timeout, 0.5)

    def _workers_ready(self, model: str) -> bool:
        status, body, _ = http("GET", f"{self.management}/models/{model}", timeout=2)
        if status != 200:
            return False
        workers = json.loads(body)[0]["workers"]
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # workers that outlived the frontend
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start(model_store: Path, workdir: Path, models: list[str], extra_config: str = "",
          timeout: float = 120, config_file: Path = ROOT / "config.properties") -> TorchServe:
    """Starts TorchServe on free loopback ports and waits until `models` are ready. `config_file`
    gives every setting but the addresses and the model store."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(5)
    urls = {key: f"http://127.0.0.1:{port}" for key, port in zip(ADDRESS_KEYS, ports)}
    lines = [line for line in config_file.read_text().splitlines()
             if not line.startswith(ADDRESS_KEYS + ("grpc_", "model_store="))]
    lines += [f"{key}={url}" for key, url in urls.items()]
    lines += [f"grpc_inference_port={ports[3]}", f"grpc_management_port={ports[4]}",
              f"model_store={model_store}", extra_config]
    config = workdir / "config.properties"
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "TMPDIR": str(workdir), "LOG_LOCATION": str(workdir / "logs"),
           "METRICS_LOCATION": str(workdir / "logs")}
    env.pop("PYTHONPATH", None)  # workers must import the handler from the archive, not the repo
    process = subprocess.Popen([str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
                               cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    server = TorchServe(process, urls["inference_address"], urls["management_address"],
                        urls["metrics_address"], workdir)
    try:
        server.wait_ready(models, timeout)
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------- KServe's ModelServer

@dataclass
class KServe:
    """`python -m handlers.kserve_model` (what `make serve-kserve` runs) on free loopback ports."""

    process: subprocess.Popen
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT, as gRPC clients take it
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-6000:]

    def wait_ready(self, models: list[str], timeout: float = 120) -> None:
        """Until every model answers GET /v2/models/<name>/ready with 200."""
        wait_until_ready(lambda: all(http("GET", f"{self.http}/v2/models/{model}/ready", timeout=2)[0] == 200
                                     for model in models), self.process, "the KServe server", self.log, timeout, 0.3)

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: KServe stops its REST and gRPC servers and exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_kserve(model_store: Path, workdir: Path, models: list[str], timeout: float = 120,
                 extra_args: tuple[str, ...] = ()) -> KServe:
    """Starts the kit's KServe ModelServer on free loopback ports and waits until `models` are ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port = free_ports(2)
    log_file = workdir / "kserve.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "python"), "-m", "handlers.kserve_model", "--model_store", str(model_store),
             "--http_port", str(http_port), "--grpc_port", str(grpc_port), *extra_args],
            cwd=ROOT, env={**os.environ, "TMPDIR": str(workdir)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = KServe(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log_file)
    try:
        server.wait_ready(models, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def live_stat(stat: Path) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, parent pid, ...); None once the
    process is gone, zombies included (they are gone, only not yet reaped)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children, grandchildren, ...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = live_stat(stat)
        if fields is not None:
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if live_stat(Path(f"/proc/{pid}/stat")) is not None}


def stop_like_ctrl_c(process: subprocess.Popen, started: set[int], probe_url: str) -> None:
    """SIGINT to the process group, as Ctrl-C in a terminal: asserts that every process in `started`
    is gone within 30 s and that `probe_url` no longer answers."""
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert alive(started) == set()
    try:
        http("GET", probe_url, timeout=2)
    except OSError:
        return
    raise AssertionError(f"{probe_url} still answers after Ctrl-C")
