"""The plain ASGI reference: Starlette on uvicorn, no batching, each request classified at once on the
event loop (one image, one forward pass): the floor of a Python HTTP path.

With PEER_CACHED_ANSWERS=1 it answers a body it has answered before from a dict, without decoding or
the model: what uvicorn and Starlette alone answer on this machine, the cost of the HTTP path
without the work (bench-peers' `asgi-cached` row).

POST /predictions: the image's bytes as the body (as curl -T sends them to TorchServe).
Run: python bench/peers/asgi_server.py PORT (settings from the environment: classifier.Settings).
"""

import os
import sys

import classifier
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def app() -> Starlette:
    """One per uvicorn worker process, each with its own ONNX Runtime session."""
    classify = classifier.load()
    cached: dict[bytes, tuple[int, str]] | None = {} if os.environ.get("PEER_CACHED_ANSWERS") == "1" else None

    async def predictions(request: Request) -> Response:
        body = await request.body()
        if cached is None:
            status, text = classify([body])[0]
        else:
            status, text = cached.get(body) or cached.setdefault(body, classify([body])[0])
        return Response(text, status, media_type="application/json")

    return Starlette(routes=[Route("/predictions", predictions, methods=["POST"]),
                             Route("/ping", lambda _: Response("ok"), methods=["GET"])])


if __name__ == "__main__":
    settings = classifier.Settings.from_environment()
    uvicorn.run("asgi_server:app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
                workers=settings.workers, log_level="warning", access_log=False)
