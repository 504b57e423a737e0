"""Container health: healthy only when every registered model can answer a prediction.

TorchServe's /ping says Healthy as soon as its frontend is up, a moment before the workers have
loaded their models; a request then gets a 503. This check also asks the management API (on the
container's loopback) that every model has at least one READY worker, so `docker compose up
--wait`, `depends_on: service_healthy` and load balancers only send traffic that will be answered.

When a model cannot serve it says which and why: an archive in the model store that TorchServe did
not register (not a readable archive, or refused: its log says more), or a registered model without a
READY worker, with the error its workers recorded while loading (handlers/torchserve_handler.py
writes it to $KIT_STATUS_DIR or the temp folder, under image-classifier-kit/<model>.json).

With --oip URL it checks the kit's KServe ModelServer instead (serve-kserve): /v2/health/ready, and
/v2/models/<name>/ready for every model of /v2/models.

Run: python3 healthcheck.py [--inference URL] [--management URL] [--model-store DIR]
     python3 healthcheck.py --oip http://127.0.0.1:8085
     exit 0 healthy, 1 not (and why, one line)
It runs in the serving image beside the kit's handlers/ (/opt/kit), whose archive reader it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the kit's folder: its handlers/ package
from handlers.archive import BrokenArchive, read_archive  # noqa: E402


def get_json(url: str, timeout: float):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def default_status_dir() -> Path:  # as handlers/torchserve_handler.py:status_dir
    return Path(os.environ.get("KIT_STATUS_DIR") or tempfile.gettempdir()) / "image-classifier-kit"


def archive_problem(path: Path) -> tuple[str, str]:
    """(the model name an archive declares, or its file name; why TorchServe may have refused it)."""
    try:
        return read_archive(path).name, "TorchServe did not register it (its log says why)"
    except BrokenArchive as error:
        return path.stem, f"not a readable model archive ({error.reason})"


def load_error(status_dir: Path, name: str) -> str:
    try:
        return json.loads((status_dir / f"{name}.json").read_text())["error"]
    except (OSError, ValueError, KeyError):
        return ""


def problems(inference: str, management: str, timeout: float, model_store: Path | None = None,
             status_dir: Path | None = None) -> list[str]:
    """What keeps the server from answering predictions; empty when it is healthy."""
    status_dir = status_dir or default_status_dir()
    try:
        status = get_json(f"{inference}/ping", timeout).get("status")
    except (OSError, ValueError) as error:  # HTTPError (503 Unhealthy) and URLError are OSErrors
        return [f"/ping failed: {error}"]
    if status != "Healthy":
        return [f"/ping says {status}"]
    try:
        models = [model["modelName"] for model in get_json(f"{management}/models", timeout)["models"]]
        described = {name: get_json(f"{management}/models/{urllib.parse.quote(name, safe='')}", timeout)
                     for name in models}
    except (OSError, ValueError, KeyError) as error:
        return [f"management API failed: {error}"]
    found = []
    if model_store is not None and model_store.is_dir():
        for path in sorted(model_store.glob("*.mar")):
            name, why = archive_problem(path)
            if name not in described:
                found.append(f"{path.name}: not loaded: {why}")
    if not models:
        return found or ["no model is registered: is the model store empty? (make train export)"]
    for name, versions in described.items():
        ready = sum(worker.get("status") == "READY" for version in versions for worker in version.get("workers", []))
        if not ready:
            error = load_error(status_dir, name)
            found.append(f"{name}: no READY worker: " + (f"loading failed: {error}" if error else "still loading"))
    return found


def oip_problems(url: str, timeout: float) -> list[str]:
    """What keeps an Open Inference Protocol server from answering; empty when it is healthy."""
    try:
        if not get_json(f"{url}/v2/health/ready", timeout).get("ready"):
            return ["/v2/health/ready says not ready"]
        models = get_json(f"{url}/v2/models", timeout)["models"]
        ready = {name: get_json(f"{url}/v2/models/{urllib.parse.quote(name, safe='')}/ready", timeout).get("ready")
                 for name in models}
    except (OSError, ValueError, KeyError) as error:
        return [f"{url} failed: {error}"]
    if not models:
        return ["no model is served"]
    return [f"{name}: not ready" for name, is_ready in ready.items() if not is_ready]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference", default="http://127.0.0.1:8080", help="inference API (%(default)s)")
    p.add_argument("--management", default="http://127.0.0.1:8081", help="management API (%(default)s)")
    p.add_argument("--oip", metavar="URL", help="check this Open Inference Protocol server instead (serve-kserve)")
    p.add_argument("--timeout", type=float, default=3, help="seconds per request (%(default)s)")
    p.add_argument("--model-store", type=Path, default=Path("/home/serve/model_store"),
                   help="archives that should be served (%(default)s; skipped when absent)")
    p.add_argument("--status-dir", type=Path, default=None, help="where workers record load errors")
    args = p.parse_args()
    if args.oip:
        found = oip_problems(args.oip.rstrip("/"), args.timeout)
    else:
        found = problems(args.inference.rstrip("/"), args.management.rstrip("/"), args.timeout, args.model_store,
                         args.status_dir)
    print("unhealthy: " + "; ".join(found) if found else "healthy")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
