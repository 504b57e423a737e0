"""Container health: healthy only when every registered model can answer a prediction.

TorchServe's /ping says Healthy as soon as its frontend is up, a moment before the workers have
loaded their models; a request then gets a 503. This check also asks the management API (on the
container's loopback) that every model has at least one READY worker, so `docker compose up
--wait`, `depends_on: service_healthy` and load balancers only send traffic that will be answered.

With --oip URL it checks the kit's KServe ModelServer instead (serve-kserve): /v2/health/ready, and
/v2/models/<name>/ready for every model of /v2/models.

Run: python3 healthcheck.py [--inference URL] [--management URL]   exit 0 healthy, 1 not (and why)
     python3 healthcheck.py --oip http://127.0.0.1:8085
Standard library only: it runs in the serving image with nothing else installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request


def get_json(url: str, timeout: float):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def problems(inference: str, management: str, timeout: float) -> list[str]:
    """What keeps the server from answering predictions; empty when it is healthy."""
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
    if not models:
        return ["no model is registered: is the model store empty? (make train export)"]
    found = []
    for name, versions in described.items():
        ready = sum(worker.get("status") == "READY" for version in versions for worker in version.get("workers", []))
        if not ready:
            found.append(f"{name}: no READY worker yet")
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
    args = p.parse_args()
    if args.oip:
        found = oip_problems(args.oip.rstrip("/"), args.timeout)
    else:
        found = problems(args.inference.rstrip("/"), args.management.rstrip("/"), args.timeout)
    print("unhealthy: " + "; ".join(found) if found else "healthy")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
