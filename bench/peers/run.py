"""`make bench-peers`: the kit's two engines against the serving frameworks users compare them with,
the same archive's ONNX model and the same pipeline behind each, loaded with wrk.

Servers (each with 2 workers, 1 ONNX Runtime thread per worker, on 127.0.0.1):
  litserve   LitServe, LitAPI batching, fast queue (bench/peers/litserve_server.py)
  bentoml    BentoML, adaptive batching (bench/peers/bentoml_service.py)
  ray        Ray Serve, @serve.batch (bench/peers/ray_server.py)
  pytriton   Triton via PyTriton, dynamic batching (bench/peers/pytriton_server.py)
  asgi       a plain ASGI app (Starlette + uvicorn), no batching: the floor of a Python HTTP path
  asgi-cached  the same app answering from a dict of the answers it gave: no decoding, no model, the
             HTTP path alone (uvicorn, which the kit's KServe path and the Python frameworks use)
  torchserve the kit on TorchServe, POST /predictions (tests/harness.py)
  kserve     the kit on KServe's ModelServer, the Open Inference Protocol with binary tensors
  kserve-unbatched  the same with --batch_images 1: each request its own forward pass (the batcher off)
The frameworks run in their own virtual environment (.venv-peers, bench/peers/requirements.txt) and
answer through the kit's own functions (bench/peers/classifier.py); the frameworks' batch limits are
the archive's batchSize and maxBatchDelay (what TorchServe uses).

Each round starts every server in turn (the order reversed every other round), checks its answer to
the test image against the kit's in-process answer (label, index, every probability to 1e-6), runs
wrk at 1, 8 and 32 clients (a Lua script counts every status; any non-200 fails the run), checks the
answer again and stops the server (its process group, then any process it started, by PID). The
table gives medians over rounds: requests/s, p50 latency, and requests/s as a ratio to the best
framework at that load. Below it: the kit's pipeline timed in this process for one image alone and per
image in a batch of batchSize (what batching can share), and the CPU a request of the KServe path
takes at 32 clients. Results and settings go to artifacts/NAME/bench-peers.json.

Needs `make train export` (artifacts/NAME, model_store/NAME.mar) and wrk; run: make bench-peers
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import harness  # noqa: E402
import oip_engines  # noqa: E402
from serve_load import parse_duration_ms  # noqa: E402

from export.data import load_run_data  # noqa: E402
from handlers.archive import read_archive  # noqa: E402
from handlers.contract import predictions_json  # noqa: E402
from handlers.pipeline import load_classifier  # noqa: E402
from handlers.store import served  # noqa: E402
from training.samples import save_png  # noqa: E402

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
CONCURRENCY = (1, 8, 32)
WORKERS, THREADS = 2, 1
TOLERANCE = 1e-6  # probabilities: OIP carries FP32, /predictions float64
FRAMEWORKS = ("litserve", "bentoml", "ray", "pytriton")  # the rows the ratio column compares with
versions_seen: dict[str, str] = {}  # versions only a running server tells (Triton's)
MAX_REQUESTS = 1_000_000  # per wrk run, besides its duration
# wrk: the request from the environment, every status counted (wrk's own summary lumps them), at most
# MAX_REQUESTS per run.
LUA = """
local f = io.open(os.getenv("WRK_BODY"), "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = os.getenv("WRK_CONTENT_TYPE")
local n = os.getenv("WRK_JSON_LENGTH"); if n ~= "" then wrk.headers["Inference-Header-Content-Length"] = n end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; other = 0; last_other = 0 end
local cap = tonumber(os.getenv("WRK_MAX_REQUESTS_PER_THREAD"))
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1; last_other = status end
  if ok + other >= cap then wrk.thread:stop() end
end
function done(summary, latency, requests)
  local total_ok, total_other, status = 0, 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok"); total_other = total_other + t:get("other")
    if t:get("last_other") ~= 0 then status = t:get("last_other") end
  end
  io.write(string.format("statuses: 200=%d other=%d last_other=%d\\n", total_ok, total_other, status))
end
"""


@dataclass(frozen=True)
class Request:
    path: str  # the URL's path
    body: bytes
    content_type: str
    headers: dict = field(default_factory=dict)


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT + the request's path
    stop: Callable[[], None]


@dataclass(frozen=True)
class Server:
    key: str
    label: str
    version: str
    batching: str  # what the framework's batching settings are here, in its own words
    request: Request
    parse: Callable[[bytes, dict], dict]  # an answer's body and headers -> {"label", "index", "probabilities"}
    start: Callable[[], Running]


# ---------------------------------------------------------------------------- requests and answers

def triton_request(path: str, image: bytes) -> Request:
    """The Open Inference Protocol with binary tensors, as Triton takes it for a model with a batch
    dimension: `image` BYTES [1, 1], the output `answer` asked for in binary."""
    data = len(image).to_bytes(4, "little") + image
    text = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                                   "parameters": {"binary_data_size": len(data)}}],
                       "outputs": [{"name": "answer", "parameters": {"binary_data": True}}]}).encode()
    return Request(path, text + data, "application/octet-stream", {"Inference-Header-Content-Length": str(len(text))})


def kserve_request(path: str, image: bytes, folder: Path) -> Request:
    """The request `make bench-serve` sends the KServe ModelServer (bench/oip_engines.py): `image`
    BYTES [1] in the binary tensor extension, binary outputs."""
    body, headers, content_type = oip_engines.oip_body(image, 1, True, folder)
    return Request(path, body.read_bytes(), content_type, headers)


def oip_outputs(body: bytes, headers: dict) -> dict[str, tuple[dict, bytes | list]]:
    """An OIP response (JSON, or JSON then binary tensors) -> {output name: (its JSON entry, raw bytes or data)}."""
    length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
    header = json.loads(body[:int(length)] if length else body)
    offset, outputs = int(length or 0), {}
    for entry in header["outputs"]:
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is None:
            outputs[entry["name"]] = (entry, entry["data"])
        else:
            outputs[entry["name"]] = (entry, body[offset:offset + size])
            offset += size
    return outputs


def bytes_elements(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        size = int.from_bytes(raw[offset:offset + 4], "little")
        elements.append(raw[offset + 4:offset + 4 + size])
        offset += 4 + size
    return elements


def parse_json(body: bytes, _headers: dict) -> dict:
    answer = json.loads(body)
    return answer[0] if isinstance(answer, list) else answer  # BentoML: one answer per image sent


def parse_triton(body: bytes, headers: dict) -> dict:
    return json.loads(bytes_elements(oip_outputs(body, headers)["answer"][1])[0])


def parse_kserve(body: bytes, headers: dict) -> dict:
    """The kit's OIP outputs (probabilities FP32 [1, classes] with the class names, label BYTES [1])."""
    import numpy as np

    outputs = oip_outputs(body, headers)
    entry, raw = outputs["probabilities"]
    names = json.loads(entry["parameters"]["class_names"])
    values = np.frombuffer(raw, "<f4") if isinstance(raw, bytes) else np.asarray(raw, dtype=np.float32)
    label_raw = outputs["label"][1]
    label = bytes_elements(label_raw)[0].decode() if isinstance(label_raw, bytes) else label_raw[0]
    return {"label": label, "index": int(values.argmax()), "probabilities": dict(zip(names, values.tolist()))}


def differences(answer: dict, expected: dict) -> float:
    """The largest probability difference; raises when label, index or classes differ."""
    if (answer.get("label"), answer.get("index")) != (expected["label"], expected["index"]):
        raise AssertionError(f"answered {answer.get('label')!r}/{answer.get('index')}, "
                             f"the kit {expected['label']!r}/{expected['index']}")
    if list(answer["probabilities"]) != list(expected["probabilities"]):
        raise AssertionError(f"classes {list(answer['probabilities'])}, the kit {list(expected['probabilities'])}")
    return max(abs(answer["probabilities"][k] - p) for k, p in expected["probabilities"].items())


# ---------------------------------------------------------------------------- processes

def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the server's main process, which stops what it started (Ray's driver shuts Serve and
    its cluster down: a SIGTERM to all of them at once would leave the driver waiting for a dead raylet),
    then to its process group (each server runs in its own session), then SIGKILL to whatever is left of
    it and of everything it started: frameworks start helpers in groups of their own (BentoML's workers),
    found through /proc before the stop and killed by PID."""
    started = harness.descendants(process.pid) | {process.pid}
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    if harness.alive(started):
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    while harness.alive(started) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pid in harness.alive(started):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_answering(url: str, request: Request, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until the server answers the request with 200 (readiness the same way for every framework)."""
    def ready() -> bool:
        return harness.http("POST", url, request.body, {"Content-Type": request.content_type, **request.headers},
                            timeout=10)[0] == 200
    harness.wait_until_ready(ready, process, url, lambda: log.read_text(errors="replace")[-6000:], timeout, 0.5)


def peer_starter(key: str, command: Callable[[int], list[str]], request: Request, env: dict,
                 scratch: Path, cwd: Path = HERE) -> Callable[[], Running]:
    def start() -> Running:
        port = harness.free_ports(1)[0]
        folder = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=scratch))
        log = folder / "server.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(command(port), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                       env={**env, "TMPDIR": str(folder), "HOME": str(folder)},
                                       start_new_session=True)
        url = f"http://127.0.0.1:{port}{request.path}"
        try:
            wait_answering(url, request, process, log)
        except BaseException:
            stop_process(process)
            raise
        return Running(url, lambda: stop_process(process))
    return start


def peers_versions() -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('litserve', 'bentoml', 'ray', 'nvidia-pytriton', 'starlette', 'uvicorn', 'onnxruntime', 'numpy', "
            "'pillow')}))")
    versions = json.loads(subprocess.run([str(PEERS_PYTHON), "-c", code], capture_output=True, text=True,
                                         check=True, timeout=120).stdout)
    return versions


def kit_versions() -> dict:
    import importlib.metadata as m
    return {p: m.version(p) for p in ("torchserve", "kserve", "onnxruntime", "numpy", "pillow")}


def servers(name: str, archive: Path, image: bytes, scratch: Path, versions: dict, config: dict) -> list[Server]:
    batch, delay, timeout = int(config["batchSize"]), float(config["maxBatchDelay"]), float(config["responseTimeout"])
    env = {"PATH": f"{PEERS_PYTHON.parent}:/usr/bin:/bin", "PEER_ARCHIVE": str(archive.resolve()),
           "PEER_WORKERS": str(WORKERS), "PEER_THREADS": str(THREADS), "PEER_MAX_BATCH": str(batch),
           "PEER_MAX_DELAY_MS": str(delay), "PEER_TIMEOUT_S": str(timeout), "PYTHONPATH": str(HERE), "LANG": "C.UTF-8"}
    script = lambda file: lambda port: [str(PEERS_PYTHON), str(HERE / file), str(port)]  # noqa: E731
    encoded = base64.b64encode(image).decode()
    litserve = Request("/predict", json.dumps({"data": encoded}).encode(), "application/json")
    bentoml = Request("/classify", json.dumps({"images": [encoded]}).encode(), "application/json")
    raw = Request("/predictions", image, "application/octet-stream")
    triton = triton_request("/v2/models/classifier/infer", image)
    kserve = kserve_request(f"/v2/models/{name}/infer", image, scratch)
    delay_s = delay / 1000

    def start_torchserve() -> Running:
        folder = Path(tempfile.mkdtemp(prefix="torchserve-", dir=scratch))
        (folder / "store").mkdir()
        shutil.copy(archive, folder / "store")
        server = harness.start(folder / "store", folder / "ts", [name])
        return Running(f"{server.inference}/predictions/{name}", server.stop)

    def kserve_starter(*extra: str):
        def start_kserve() -> Running:
            folder = Path(tempfile.mkdtemp(prefix="kserve-", dir=scratch))
            (folder / "store").mkdir()
            shutil.copy(archive, folder / "store")
            server = harness.start_kserve(folder / "store", folder, [name],
                                          extra_args=("--workers", str(WORKERS), "--threads", str(THREADS), *extra))
            return Running(f"{server.http}/v2/models/{name}/infer", server.stop)
        return start_kserve

    return [
        Server("litserve", f"LitServe {versions['litserve']}", versions["litserve"],
               f"LitAPI max_batch_size={batch}, batch_timeout={delay_s} s, fast_queue", litserve, parse_json,
               peer_starter("litserve", script("litserve_server.py"), litserve, env, scratch)),
        Server("bentoml", f"BentoML {versions['bentoml']}", versions["bentoml"],
               f"batchable, max_batch_size={batch}, max_latency_ms={round(timeout * 1000)} (adaptive)", bentoml,
               parse_json, peer_starter("bentoml", lambda port: [
                   str(PEERS_PYTHON.parent / "bentoml"), "serve", "bentoml_service:Classifier", "--host", "127.0.0.1",
                   "--port", str(port)], bentoml, env, scratch)),
        Server("ray", f"Ray Serve {versions['ray']}", versions["ray"],
               f"@serve.batch max_batch_size={batch}, batch_wait_timeout_s={delay_s}, max_ongoing_requests={2 * batch}",
               raw, parse_json,
               peer_starter("ray", script("ray_server.py"), raw, env, scratch)),
        Server("pytriton", f"Triton via PyTriton {versions['nvidia-pytriton']}",
               versions["nvidia-pytriton"],
               f"dynamic batching, max_batch_size={batch}, max_queue_delay_microseconds={round(delay * 1000)}",
               triton, parse_triton, peer_starter("pytriton", script("pytriton_server.py"), triton, env, scratch)),
        Server("asgi", f"Starlette {versions['starlette']} + uvicorn {versions['uvicorn']}", versions["starlette"],
               "none (one request, one forward pass)", raw, parse_json,
               peer_starter("asgi", script("asgi_server.py"), raw, env, scratch)),
        Server("asgi-cached", "the same, answers cached (HTTP path alone)", versions["starlette"],
               "none; a body answered before is answered from a dict: no decoding, no model", raw, parse_json,
               peer_starter("asgi-cached", script("asgi_server.py"), raw, {**env, "PEER_CACHED_ANSWERS": "1"},
                            scratch)),
        Server("torchserve", "the kit, TorchServe /predictions", kit_versions()["torchserve"],
               f"TorchServe batchSize={batch}, maxBatchDelay={delay:g} ms", raw, parse_json, start_torchserve),
        Server("kserve", "the kit, KServe ModelServer, OIP binary", kit_versions()["kserve"],
               f"the kit's, from the archive's model-config (batchSize={batch}, maxBatchDelay={delay:g} ms)",
               kserve, parse_kserve, kserve_starter()),
        Server("kserve-unbatched", "the kit, KServe ModelServer, OIP binary, unbatched", kit_versions()["kserve"],
               "none (--batch_images 1: each request its own forward pass)", kserve, parse_kserve,
               kserve_starter("--batch_images", "1")),
    ]


# ---------------------------------------------------------------------------- measuring

def wrk(url: str, request: Request, concurrency: int, seconds: int, lua: Path, body: Path) -> dict:
    command = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{seconds}s", "--latency",
               "--timeout", "10s", "-s", str(lua), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 60, env={
        "WRK_BODY": str(body), "WRK_CONTENT_TYPE": request.content_type, "PATH": "/usr/bin:/bin",
        "WRK_JSON_LENGTH": request.headers.get("Inference-Header-Content-Length", ""),
        "WRK_MAX_REQUESTS_PER_THREAD": str(MAX_REQUESTS // min(2, concurrency))}).stdout
    statuses = re.search(r"statuses: 200=(\d+) other=(\d+) last_other=(\d+)", output)
    if "Latency Distribution" not in output or statuses is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
            "p50_ms": parse_duration_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1)),
            "p99_ms": parse_duration_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1)),
            "ok": int(statuses.group(1)), "other": int(statuses.group(2)), "last_other": int(statuses.group(3)),
            "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0}


def check_answer(server: Server, url: str, expected: dict) -> float:
    request = server.request
    status, body, headers = harness.http("POST", url, request.body,
                                         {"Content-Type": request.content_type, **request.headers})
    if status != 200:
        raise AssertionError(f"{server.label}: status {status}: {body[:300]!r}")
    try:
        return differences(server.parse(body, headers), expected)
    except (AssertionError, KeyError, ValueError) as error:
        raise AssertionError(f"{server.label}: {error}: {body[:300]!r}") from None


def measure(server: Server, expected: dict, seconds: int, scratch: Path, lua: Path) -> tuple[dict, float]:
    """One server started, checked, loaded at every concurrency, checked again and stopped."""
    body = scratch / f"{server.key}.body"
    body.write_bytes(server.request.body)
    running = server.start()
    try:
        worst = check_answer(server, running.url, expected)
        if server.key == "pytriton":  # the Triton server's own version, from its metadata
            versions_seen["tritonserver"] = json.loads(harness.http("GET", running.url.split("/v2/")[0] + "/v2")[1]
                                                       )["version"]
        wrk(running.url, server.request, 8, 1, lua, body)  # warm-up
        rows = {}
        for concurrency in CONCURRENCY:
            row = wrk(running.url, server.request, concurrency, seconds, lua, body)
            if row["other"] or row["socket_errors"] or not row["ok"]:
                raise AssertionError(f"{server.label} at {concurrency} clients: {row['other']} answers not 200 "
                                     f"(last {row['last_other']}), {row['socket_errors']} socket errors")
            if row["ok"] + row["other"] >= MAX_REQUESTS:  # wrk's rate counts the whole duration
                raise AssertionError(f"{server.label} at {concurrency} clients reached {MAX_REQUESTS} requests "
                                     "before the run's end: a shorter --seconds measures it")
            rows[concurrency] = row
        worst = max(worst, check_answer(server, running.url, expected))
    finally:
        running.stop()
    if worst > TOLERANCE:
        raise AssertionError(f"{server.label}: probabilities differ from the kit's by {worst:.2e}")
    return rows, worst


def kit_classifier(archive_path: Path, scratch: Path):
    """The archive's classifier in this process, with the servers' thread count."""
    archive = read_archive(archive_path)
    return load_classifier(archive.unpack(scratch / "kit-model"),
                           dataclasses.replace(archive.settings, threads=THREADS), 1, None)


def pipeline_microseconds(classifier, image: bytes, batch: int, seconds: float = 2.0) -> float:
    """The kit's pipeline in this process (decode, normalize, one forward pass, softmax, the answers' JSON):
    the median µs per image over calls on `batch` copies of the image. What batching can share is the
    difference between batch 1 and batch N."""
    rows, per_image, deadline = [{"body": image}] * batch, [], time.monotonic() + seconds
    while time.monotonic() < deadline or len(per_image) < 5:
        start = time.perf_counter()
        predictions_json(rows, classifier)
        per_image.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(per_image)


def processor() -> str:
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else platform.machine()


def print_table(rows: dict, chosen: list[Server]) -> None:
    best = {c: max((rows[s.key][c]["requests_per_second"] for s in chosen if s.key in FRAMEWORKS), default=None)
            for c in CONCURRENCY}
    print(f"{'requests/s (p50 ms) [x best framework]':<46}" + "".join(f"{f'{c} client' + ('s' if c > 1 else ''):>28}"
                                                                       for c in CONCURRENCY))
    for server in chosen:
        cells = []
        for c in CONCURRENCY:
            row = rows[server.key][c]
            ratio = f" [{row['requests_per_second'] / best[c]:.2f}x]" if best[c] else ""
            cells.append(f"{row['requests_per_second']:,.0f} ({row['p50_ms']:.2f}){ratio}")
        print(f"{server.label:<46}" + "".join(f"{cell:>28}" for cell in cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--seconds", type=int, default=10, help="duration of each wrk run, whole seconds (%(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; figures are medians (%(default)s)")
    p.add_argument("--servers", default="all", help="comma-separated subset of litserve,bentoml,ray,pytriton,"
                                                    "asgi,asgi-cached,torchserve,kserve,kserve-unbatched (%(default)s)")
    p.add_argument("--out", type=Path, help="the results' JSON file (artifacts/NAME/bench-peers.json)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk is not installed: apt-get install wrk (make bench-peers does this)")
    if not PEERS_PYTHON.is_file():
        raise SystemExit("error: no .venv-peers: make bench-peers builds it")
    out_dir = ROOT / "artifacts" / args.name
    archive = served(ROOT / "model_store").get(args.name)  # the live version, as make serve serves it
    if archive is None or not archive.is_file() or not (out_dir / "spec.json").is_file():
        raise SystemExit(f"error: run `make train export NAME={args.name}` first")
    config = read_archive(archive).model_config
    versions = peers_versions()
    started, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        image_path = scratch / "test-image.png"
        save_png(load_run_data(out_dir)[0].test.images[0], image_path)  # the run's own test split
        image = image_path.read_bytes()
        classifier = kit_classifier(archive, scratch)
        expected = json.loads(predictions_json([{"body": image}], classifier)[0])
        in_process = {n: pipeline_microseconds(classifier, image, n) for n in (1, int(config["batchSize"]))}
        lua = scratch / "count.lua"
        lua.write_text(LUA)
        every = servers(args.name, archive, image, scratch, versions, config)
        wanted = [key for key in args.servers.split(",")] if args.servers != "all" else [s.key for s in every]
        unknown = set(wanted) - {s.key for s in every}
        if unknown:
            raise SystemExit(f"error: unknown server(s) {sorted(unknown)}")
        chosen = [s for s in every if s.key in wanted]
        runs: dict[str, dict[int, list[dict]]] = {s.key: {c: [] for c in CONCURRENCY} for s in chosen}
        worst: dict[str, float] = {}
        for round_index in range(args.rounds):
            for server in chosen if round_index % 2 == 0 else chosen[::-1]:
                print(f"round {round_index + 1}/{args.rounds}: {server.label}", flush=True)
                rows, difference = measure(server, expected, args.seconds, scratch, lua)
                worst[server.key] = max(worst.get(server.key, 0.0), difference)
                for c, row in rows.items():
                    runs[server.key][c].append(row)
    medians = {key: {c: {k: statistics.median(r[k] for r in rounds) for k in ("requests_per_second", "p50_ms",
                                                                                 "p99_ms")}
                     for c, rounds in by_c.items()} for key, by_c in runs.items()}
    load = (load_before, os.getloadavg()[0])  # 1-minute load averages
    print(f"machine: {processor()}, {os.cpu_count()} cores, load before/after "
          f"{load[0]:.2f}/{load[1]:.2f}; model {args.name}; {WORKERS} workers x {THREADS} ONNX Runtime thread; "
          f"batches of up to "
          f"{config['batchSize']}, {config['maxBatchDelay']} ms; wrk {args.seconds} s per run, median of "
          f"{args.rounds} round(s); every answer 200 and equal to the kit's (largest probability difference "
          f"{max(worst.values()):.1e})")
    print_table(medians, chosen)
    batch = int(config["batchSize"])
    alone, in_batch = in_process[1], in_process[batch]  # one entry when the archive's batchSize is 1
    print(f"in this process, {THREADS} ONNX Runtime thread: the kit's pipeline (decode, normalize, forward pass, "
          f"softmax, answer) takes {alone:.0f} µs for an image alone and {in_batch:.0f} µs per image in a batch of "
          f"{batch}: batching can share {alone - in_batch:.0f} µs of it")
    for key in ("kserve-unbatched", "kserve"):
        if key in medians:
            cost = os.cpu_count() / medians[key][32]["requests_per_second"] * 1e6
            print(f"  {key}: {cost:.0f} µs of the {os.cpu_count()} cores per request at 32 clients (wrk's share "
                  f"included)")
    for server in chosen:
        print(f"  {server.label}: batching {server.batching}")
    record = {"name": args.name, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "machine": {"processor": processor(), "cores": os.cpu_count(),
                          "load_average_before_after": load},
              "seconds": args.seconds, "rounds": args.rounds, "workers": WORKERS, "onnxruntime_threads": THREADS,
              "archive": {"batchSize": config["batchSize"], "maxBatchDelay": config["maxBatchDelay"]},
              "pipeline_microseconds_per_image": {str(n): v for n, v in in_process.items()},
              "versions": {"peers": {**versions, **versions_seen}, "kit": kit_versions()},
              "servers": {s.key: {"label": s.label, "version": s.version, "batching": s.batching,
                                  "request": {"path": s.request.path, "content_type": s.request.content_type},
                                  "largest_probability_difference": worst[s.key],
                                  "median": {str(c): v for c, v in medians[s.key].items()},
                                  "rounds": {str(c): v for c, v in runs[s.key].items()}} for s in chosen}}
    out = args.out or out_dir / "bench-peers.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
