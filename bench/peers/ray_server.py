"""Ray Serve with its batching: `@serve.batch(max_batch_size, batch_wait_timeout_s)` on a deployment of
`workers` replicas (max_ongoing_requests: twice max_batch_size), Serve's HTTP proxy on 127.0.0.1, the
node on 127.0.0.1, access log off.

POST /predictions: the image's bytes as the body. The answer: the kit's JSON object.
Run: python bench/peers/ray_server.py PORT (settings from the environment: classifier.Settings; Ray's
replicas get PYTHONPATH and the settings through the runtime environment). SIGTERM or SIGINT shuts
Serve and the local Ray cluster down.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

# A single-machine Ray: its node address is 127.0.0.1 (Ray otherwise replaces 127.0.0.1 with the
# machine's reachable address), so the proxy, the replicas and Ray's own services talk over loopback.
# Ray's worker processes still listen on all interfaces; nothing is sent to them but from here.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import classifier  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

SETTINGS = classifier.Settings.from_environment()


@serve.deployment
class Classifier:
    def __init__(self) -> None:
        self.classify = classifier.load(SETTINGS)

    @serve.batch(max_batch_size=SETTINGS.max_batch, batch_wait_timeout_s=SETTINGS.max_delay_ms / 1000)
    async def answer(self, images: list[bytes]) -> list[Response]:
        return [Response(text, status, media_type="application/json") for status, text in self.classify(images)]

    async def __call__(self, request: Request) -> Response:
        return await self.answer(await request.body())


def main(port: int) -> None:
    here = str(Path(__file__).resolve().parent)
    env_vars = {key: value for key, value in os.environ.items() if key.startswith("PEER_")}
    env_vars["PYTHONPATH"] = os.pathsep.join([here, str(classifier.ROOT)])
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env_vars})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Ray's batching guide: a replica's max_ongoing_requests (5 by default) above max_batch_size, or no
    # batch grows past it.
    deployment = Classifier.options(num_replicas=SETTINGS.workers, max_ongoing_requests=2 * SETTINGS.max_batch)
    serve.run(deployment.bind(), route_prefix="/predictions",
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
