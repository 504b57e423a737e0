"""Send image files to the kit's endpoint and print the top classes: `python -m client IMAGE...`.

Only the standard library: it runs wherever Python does, beside the server or far from it.
  python -m client shoe.png bag.jpg                    # model fashion-mnist on localhost:8080
  python -m client --model fashion-mnist-torchscript --top 5 shoe.png
A 503 (the server sheds load when its queue is full) is retried with backoff, up to 6 times.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def predict(url: str, image: bytes, timeout: float = 30) -> tuple[int, dict]:
    """POSTs raw image bytes (with a Content-Type, so TorchServe passes them through untouched)."""
    request = urllib.request.Request(url, data=image, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except json.JSONDecodeError:
            return error.code, {"error": body.decode(errors="replace").strip()}


RETRIES = 6  # 503: the server's queue is full (or a worker is restarting); back off and try again


def predict_with_retries(url: str, image: bytes, retries: int = RETRIES) -> tuple[int, dict]:
    """`predict`, retrying a 503 with exponential backoff and jitter (0.1 s, 0.2 s, ... about 6 s in all)."""
    for attempt in range(retries + 1):
        status, body = predict(url, image)
        if status != 503 or attempt == retries:
            return status, body
        time.sleep(0.1 * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    p.add_argument("--model", default="fashion-mnist", help="model name (%(default)s)")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="inference address (%(default)s)")
    p.add_argument("--top", type=int, default=3, help="classes to print per image (%(default)s)")
    args = p.parse_args(argv)
    failures = 0
    for path in args.images:
        try:
            image = path.read_bytes()
        except OSError as error:
            print(f"{path}: error: {error.strerror or error}", file=sys.stderr)
            failures += 1
            continue
        try:
            status, body = predict_with_retries(f"{args.url}/predictions/{args.model}", image)
        except OSError as error:  # refused connection, timeout: the same for every other image
            reason = getattr(error, "reason", None) or error
            print(f"error: cannot reach {args.url} ({reason}): start the server (make serve, or "
                  "docker compose up)", file=sys.stderr)
            return 1
        if status != 200:
            message = body.get("error") or body.get("message") or body
            print(f"{path}: error {status}: {message}", file=sys.stderr)
            failures += 1
            continue
        ranked = sorted(body["probabilities"].items(), key=lambda item: -item[1])[:args.top]
        print(f"{path}: {body['label']}  (" + ", ".join(f"{name} {p:.1%}" for name, p in ranked) + ")")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
