"""Put another version of a model behind a running TorchServe without dropping a request.

  make rollout NAME=x [VERSION=n] [FORCE=1]     python -m export.rollout --name x [--version n] [--force]
  make rollback NAME=x                          python -m export.rollout --name x --rollback

A rollout checks version n's archive in model_store/ (readable, its export gates passed, its test
accuracy at most 0.5 points below the live version's unless --force), registers it beside the live
version over TorchServe's management API, waits until its workers are READY, sends it the test
images export recorded in its archive (release.json) and compares the answers, makes it the default
version, waits until the old version has no request left, unregisters it and records n as live
(handlers/store.py). Requests to /predictions/x are answered throughout, by one version or the other.
A rollback is the same move back to the version that was live before. Each step prints one line with
the time it took; whatever refuses is one line and a non-zero exit. Standard library and handlers/ only,
so the serving image can run it too (docs/versions.md).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.parse
from pathlib import Path

from handlers import management
from handlers.archive import Archive, BrokenArchive, read_archive
from handlers.store import archive_path, read_live, versions, write_live

ACCURACY_POINTS = 0.5  # a version this much less accurate than the live one needs --force
TOLERANCE = 1e-5  # the served answers against those export recorded
GRACE_S = 1.0  # after the old version's queue is empty: a request a worker already took finishes
READY_TIMEOUT_S = 180.0


class Refused(Exception):
    """Why a rollout or rollback does not happen (or stops): one line for the user."""


def call(address: str, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, object]:
    """(status, JSON body or text) of one HTTP request to `address` (http://... or unix:/path); a server that
    does not answer is Refused."""
    try:
        status, payload = management.request(address, method, path, body, timeout,
                                             {"Content-Type": "application/octet-stream"} if body else None)
    except OSError as error:
        raise Refused(f"no TorchServe answers at {address} ({error.strerror or error}): start it with make serve"
                      ) from None
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


class Server:
    """The running TorchServe: its management API (versions) and inference API (the check)."""

    def __init__(self, management: str, inference: str):
        self.management, self.inference = management.rstrip("/"), inference.rstrip("/")

    def model_url(self, name: str, version: str | None = None) -> str:
        path = urllib.parse.quote(name, safe="") + ("" if version is None else f"/{urllib.parse.quote(version)}")
        return f"/models/{path}"

    def manage(self, method: str, path: str, timeout: float = 30) -> tuple[int, object]:
        return call(self.management, method, path, timeout=timeout)

    def versions(self, name: str) -> tuple[str, list[str]]:
        """(the default version, every registered version) of `name`; a name it does not serve is Refused."""
        status, described = self.manage("GET", self.model_url(name))
        if status == 404:
            _, listed = self.manage("GET", "/models")
            names = [m.get("modelName") for m in listed.get("models", [])] if isinstance(listed, dict) else []
            raise Refused(f"the server does not serve a model named {name!r} (it serves {', '.join(names) or 'none'})")
        if status != 200 or not isinstance(described, list) or not described:
            raise Refused(f"the management API answered {status} for {name!r}: {described}")
        _, every = self.manage("GET", self.model_url(name, "all"))
        registered = [d["modelVersion"] for d in every] if isinstance(every, list) else [described[0]["modelVersion"]]
        return described[0]["modelVersion"], registered

    def describe(self, name: str, version: str) -> dict | None:
        status, described = self.manage("GET", self.model_url(name, version))
        return described[0] if status == 200 and isinstance(described, list) and described else None

    def register(self, archive: Archive) -> None:
        query = urllib.parse.urlencode({"url": archive.path.name, "model_name": archive.name,
                                        "initial_workers": archive.workers, "synchronous": "true"})
        status, answer = self.manage("POST", f"/models?{query}", timeout=READY_TIMEOUT_S)
        if status != 200:
            raise Refused(f"TorchServe did not register {archive.path.name} ({status}: {message(answer)})")

    def wait_ready(self, name: str, version: str, workers: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            described = self.describe(name, version) or {}
            ready = [w for w in described.get("workers", []) if w.get("status") == "READY"]
            if len(ready) >= max(1, workers):
                return
            time.sleep(0.2)
        raise Refused(f"version {version} of {name} has no READY worker after {READY_TIMEOUT_S:.0f}s "
                      "(logs/model_log.log says why)")

    def set_default(self, name: str, version: str) -> None:
        status, answer = self.manage("PUT", f"{self.model_url(name, version)}/set-default")
        if status != 200:
            raise Refused(f"TorchServe did not make version {version} of {name} the default ({message(answer)})")

    def drain(self, name: str, version: str) -> None:
        """Until the version's queue is empty, then GRACE_S for the requests its workers hold."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            described = self.describe(name, version)
            if described is None or described.get("jobQueueStatus", {}).get("pendingRequests", 0) == 0:
                break
            time.sleep(0.1)
        time.sleep(GRACE_S)

    def unregister(self, name: str, version: str) -> None:
        status, answer = self.manage("DELETE", self.model_url(name, version), timeout=120)
        if status != 200:
            raise Refused(f"TorchServe did not unregister version {version} of {name} ({message(answer)})")

    def check_answers(self, archive: Archive) -> int:
        """Sends the archive's recorded test images to this version; returns how many matched (all, or Refused)."""
        samples = archive.release["samples"]
        path = f"/predictions/{urllib.parse.quote(archive.name, safe='')}/{archive.version}"
        for position, sample in enumerate(samples):
            status, answer = call(self.inference, "POST", path, base64.b64decode(sample["png"]))
            if status != 200 or not isinstance(answer, dict):
                raise Refused(f"version {archive.version} answered test image {position} with {status}: "
                              f"{message(answer)}")
            served = [answer["probabilities"][label] for label in archive.spec.class_names]
            worst = max(abs(a - b) for a, b in zip(served, sample["probabilities"]))
            if worst > TOLERANCE or answer.get("model_version") != archive.version:
                raise Refused(f"version {archive.version} answered test image {position} unlike its export "
                              f"(max difference {worst:.2e}, model_version {answer.get('model_version')!r})")
        return len(samples)


def message(answer: object) -> str:
    return str(answer.get("message", answer)) if isinstance(answer, dict) else str(answer)[:200]


def candidate(model_store: Path, name: str, version: int) -> Archive:
    """Version `version` of `name` from the store, readable and with its export record; else Refused."""
    path = archive_path(model_store, name, version)
    if not path.is_file():
        present = ", ".join(map(str, versions(model_store).get(name, {}))) or "none"
        raise Refused(f"version {version} of {name} is not in {model_store}/ (versions there: {present})")
    try:
        archive = read_archive(path)
    except BrokenArchive as error:
        raise Refused(str(error)) from None
    if archive.name != name or archive.version != str(version):
        raise Refused(f"{path} holds {archive.name} version {archive.version}, not {name} version {version}: "
                      "make export writes archives under their own name")
    if not (archive.release or {}).get("samples"):
        raise Refused(f"{path} has no export record (release.json): export it again with this kit")
    return archive


def gate(archive: Archive, live: Archive | None, force: bool, rollback: bool = False) -> str:
    """What the accuracy gate says (one line); Refused unless it passes or `force`. A rollback returns to a
    version that was live before: the gate only reports."""
    release = archive.release
    accuracy = float(release.get("test_accuracy", 0.0))
    problems = []
    if not release.get("gates_passed"):
        problems.append("its export gates did not pass")
    if live is not None and live.release and "test_accuracy" in live.release:
        live_accuracy = float(live.release["test_accuracy"])
        if (live_accuracy - accuracy) * 100 > ACCURACY_POINTS:
            problems.append(f"its test accuracy {accuracy:.2%} is {(live_accuracy - accuracy) * 100:.2f} points below "
                            f"version {live.version}'s {live_accuracy:.2%} (at most {ACCURACY_POINTS} allowed)")
    summary = f"test accuracy {accuracy:.2%}" + ("" if live is None or not live.release else
                                                 f", live version {live.version}: "
                                                 f"{float(live.release.get('test_accuracy', 0)):.2%}")
    if problems and not (force or rollback):
        raise Refused(f"version {archive.version} of {archive.name} refused: {'; '.join(problems)} "
                      "(FORCE=1 rolls it out anyway)")
    if problems and rollback:
        return summary + " (a rollback: the accuracy gate does not apply)"
    return summary + (f" (forced past: {'; '.join(problems)})" if problems else "")


def move(server: Server, model_store: Path, name: str, target: int | None, force: bool, rollback: bool) -> int:
    """Rollout (or rollback) of `name` to `target`; prints one line per step. Returns the exit status."""
    started = time.monotonic()
    clock = [started]

    def step(text: str) -> None:
        now = time.monotonic()
        print(f"{text}  ({now - clock[0]:.2f}s)", flush=True)
        clock[0] = now

    default, registered = server.versions(name)
    live = int(default) if default.isdigit() else None
    if rollback:
        target = (read_live(model_store).get(name) or {}).get("previous")
        if not isinstance(target, int):
            older = [v for v in versions(model_store).get(name, {}) if live is None or v < live]
            if not older:
                raise Refused(f"nothing to roll back to: no version of {name} was live before {default}")
            target = max(older)
    elif target is None:
        known = versions(model_store).get(name)
        if not known:
            raise Refused(f"no version of {name} in {model_store}/: run make export NAME={name}")
        target = max(known)
    archive = candidate(model_store, name, target)
    if archive.version == default:
        print(f"version {target} of {name} is already live")
        write_live(model_store, name, target, (read_live(model_store).get(name) or {}).get("previous"))
        return 0
    live_archive = None
    if live is not None and archive_path(model_store, name, live).is_file():
        try:
            live_archive = read_archive(archive_path(model_store, name, live))
        except BrokenArchive:
            live_archive = None
    summary = gate(archive, live_archive, force, rollback)
    step(f"checked {archive.path.name}: {summary}")
    if archive.version not in registered:
        server.register(archive)
    step(f"registered version {target} beside version {default}")
    server.wait_ready(name, archive.version, archive.workers)
    step(f"version {target}: {archive.workers} worker(s) READY")
    try:
        checked = server.check_answers(archive)
    except Refused:
        server.unregister(name, archive.version)  # nothing else changed: the live version still serves
        raise
    step(f"version {target}: {checked} test images answered as export recorded (within {TOLERANCE:g})")
    server.set_default(name, archive.version)
    step(f"version {target} is the default: /predictions/{name} goes to it")
    server.drain(name, default)
    step(f"version {default}: no request left")
    server.unregister(name, default)
    step(f"unregistered version {default}")
    record = write_live(model_store, name, target, live)
    print(f"{'rollback' if rollback else 'rollout'} of {name} to version {target} took "
          f"{time.monotonic() - started:.2f}s (live version recorded in {record})", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the served model's name")
    p.add_argument("--version", type=int, help="the version to roll out (default: the newest in the store)")
    p.add_argument("--rollback", action="store_true", help="back to the version that was live before")
    p.add_argument("--force", action="store_true", help="past the accuracy gate")
    p.add_argument("--model-store", type=Path, default=Path(os.environ.get("KIT_MODEL_STORE", "model_store")),
                   help="(%(default)s)")
    p.add_argument("--management", default=os.environ.get("KIT_MANAGEMENT") or management.default_address(),
                   help="TorchServe's management API: unix:/path or http://host:port (%(default)s)")
    p.add_argument("--inference", default=os.environ.get("KIT_INFERENCE", "http://127.0.0.1:8080"),
                   help="TorchServe's inference API (%(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rollback and args.version is not None:
        print("error: --rollback goes back to the version live before; give --version for a rollout", file=sys.stderr)
        return 2
    try:
        return move(Server(args.management, args.inference), args.model_store, args.name, args.version, args.force,
                    args.rollback)
    except Refused as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
