"""The demo page's local server: `python -m demo` (or `make demo`), then open the address it prints
while TorchServe runs (`make serve`). Opens no browser by itself.

The page (demo/index.html, demo.js, preview.js, demo.css) calls the model server straight from the
browser, so the server must allow this page's origin: config.properties sets
cors_allowed_origin=http://127.0.0.1:8090, the default address here. Serving the page elsewhere
(--port, --host) means changing that line, or TS_CORS_ALLOWED_ORIGIN for `make serve`, to match.
  python -m demo                                   # http://127.0.0.1:8090/, TorchServe on 8080/8081
  python -m demo --inference http://127.0.0.1:9080 --management http://127.0.0.1:9081
A management API on a Unix socket (what `make serve` uses, handlers/management.py), which a browser
cannot reach, is passed on by this server under /management/: only GET /models and GET /models/<name>.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from handlers import management

DEMO_DIR = Path(__file__).resolve().parent
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8090
FILES = {  # URL path -> (file in demo/, content type): nothing else is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/preview.js": ("preview.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}


def origin(host: str, port: int) -> str:
    """The page's origin, the value TorchServe's cors_allowed_origin must have."""
    return f"http://{host}:{port}"


def make_handler(settings: dict) -> type[BaseHTTPRequestHandler]:
    """Static files from FILES, /config.json: the endpoints the page talks to by default, and where the
    management API is a Unix socket, its two read-only routes under /management/."""

    class DemoHandler(BaseHTTPRequestHandler):
        server_version = "kit-demo"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.answer(with_body=True)

        def do_HEAD(self):  # noqa: N802
            self.answer(with_body=False)

        def answer(self, with_body: bool) -> None:
            path = urlsplit(self.path).path
            if path == "/config.json":
                body, content_type = json.dumps(settings["page"]).encode(), "application/json"
            elif settings.get("socket") and path.startswith("/management/models"):
                self.pass_on(with_body)
                return
            elif path in FILES:
                file_name, content_type = FILES[path]
                body = (DEMO_DIR / file_name).read_bytes()
            else:
                self.send_error(HTTPStatus.NOT_FOUND, "not part of the demo page")
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def pass_on(self, with_body: bool) -> None:
            forwarded = self.path.removeprefix("/management")
            if forwarded.split("?", 1)[0].count("/") > 2:  # /models or /models/<name>, nothing else
                self.send_error(HTTPStatus.NOT_FOUND, "not part of the demo page")
                return
            try:
                status, body = management.request(settings["socket"], "GET", forwarded, timeout=10)
            except OSError as error:
                status, body = 502, json.dumps({"message": f"no TorchServe at {settings['socket']}: {error}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            pass  # the page loads four files: no log line per file

    return DemoHandler


def start(host: str, port: int, inference: str, management: str) -> ThreadingHTTPServer:
    """The demo server, answering in a background thread until `stop(server)` (tests use this)."""
    page = {"inference": inference.rstrip("/"), "management": management.rstrip("/"), "protocol": "torchserve"}
    settings = {"page": page, "socket": management if management.startswith("unix:") else None}
    server = ThreadingHTTPServer((host, port), make_handler(settings))
    if settings["socket"]:  # the page asks this server, which passes the requests on to the socket
        page["management"] = f"{origin(host, server.server_address[1])}/management"
    threading.Thread(target=server.serve_forever, name="demo-server", daemon=True).start()
    return server


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (%(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="(%(default)s)")
    p.add_argument("--inference", default="http://127.0.0.1:8080", help="TorchServe's inference API (%(default)s)")
    p.add_argument("--management", default=management.default_address(),
                   help="TorchServe's management API: the model list and metadata; unix:/path (make serve's) "
                        "or http://host:port (%(default)s)")
    args = p.parse_args(argv)
    try:
        server = start(args.host, args.port, args.inference, args.management)
    except OSError as error:
        print(f"error: cannot serve the demo on {args.host}:{args.port} ({error.strerror or error}): "
              "choose another --port (and set cors_allowed_origin to match)", file=sys.stderr)
        return 2
    page = origin(args.host, server.server_address[1])
    print(f"demo page: {page}/  (Ctrl-C stops it)\n"
          f"it calls {args.inference} and {args.management} from the browser: their config.properties needs "
          f"cors_allowed_origin={page}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("\nstopping the demo page")
    finally:
        stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
