"""TorchServe's management API, where the kit's own commands reach it: an http:// URL or a Unix socket.

`make serve` puts the management API on a Unix socket, unix:<run dir>/management.sock, in a directory
only the server's user may enter (0700): the kit's commands on this machine (make rollout, the demo
page's server, the container's health check) reach it, other users and other machines do not, and
no TCP port carries it. `request` speaks HTTP to either kind of address; `run_dir` is that directory.
Plain standard library: the demo, the health check and export/rollout.py import it.
"""

from __future__ import annotations

import http.client
import os
import socket
import stat
import tempfile
from pathlib import Path

SOCKET_NAME = "management.sock"


def run_dir() -> Path:
    """Where `make serve` puts the management socket: $KIT_RUN_DIR, else a folder of this user's in $TMPDIR."""
    return Path(os.environ.get("KIT_RUN_DIR") or Path(tempfile.gettempdir()) / f"image-classifier-kit-{os.getuid()}")


def default_address() -> str:
    return f"unix:{run_dir() / SOCKET_NAME}"


def private_run_dir(path: Path) -> Path:
    """Creates `path` (0700) or checks that it is this user's and closed to others; raises ValueError if not."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ValueError(f"{path} is not a directory of this user's: set KIT_RUN_DIR to one")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def connection(address: str, timeout: float) -> http.client.HTTPConnection:
    if address.startswith("unix:"):
        return UnixHTTPConnection(address.removeprefix("unix:"), timeout)
    parts = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = parts.rpartition(":")
    return http.client.HTTPConnection(host or parts, int(port) if port.isdigit() else 80, timeout=timeout)


def request(address: str, method: str, path: str, body: bytes | None = None, timeout: float = 30,
            headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request to `address` (http://host:port or unix:/path); OSError if none answers."""
    conn = connection(address, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def prepare_socket() -> str:
    """The address `make serve` gives TorchServe: the run directory made private, a stale socket (a server
    killed before it could remove it) removed, since TorchServe cannot bind over it."""
    path = private_run_dir(run_dir()) / SOCKET_NAME
    if path.exists():
        try:
            request(f"unix:{path}", "GET", "/models", timeout=2)
        except OSError:
            path.unlink(missing_ok=True)
        else:
            raise ValueError(f"a TorchServe already answers on {path}: stop it first, or set KIT_RUN_DIR")
    return f"unix:{path}"


if __name__ == "__main__":  # make serve: prints the management address to use
    import sys

    try:
        print(prepare_socket())
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
