"""Memory the served models need, checked against the container's limit before TorchServe starts.

A container that runs out of memory is killed by the kernel (exit 137) with nothing in its own log
that says why. This check reads every archive in the model store (workers, batchSize, the pixel
limit and the model file's size from model-config.yaml and the archive) and the container's memory
limit (cgroup v2 or v1), and refuses to start with one line that says what to change when the
models cannot fit. The formula, with figures measured on the kit's machines (docs/reliability.md,
"Memory the deployment needs"):

  need = FRONTEND + SHARED + sum over models of model(m) + max over models of model(m)
  model(m) = workers x (WORKER + 3 x model file + 4.2 bytes x max_pixels + 12 MB + batchSize x max_request_size)

FRONTEND: TorchServe's JVM (-Xmx512m plus what it holds outside the heap); SHARED: the libraries
every worker maps (torch, ONNX Runtime), counted once; WORKER: a worker's private memory at rest
(TorchServe's worker imports torch whatever the model); the decode term: the most one request's
image decoding takes (handlers/image.py: JPEG decodes at reduced scale, other formats at most
about 4 bytes per allowed pixel); the last term: the request bodies of one batch. The largest model
counts twice: during a rollout (docs/versions.md) its new version's workers run beside the old ones.

Run: python3 memory_budget.py [--model-store DIR] [--config config.properties] [-- command ...]
     exit 0 and then exec `command` when the models fit, 3 and one line on stderr when not.
It runs in the serving image beside the kit's handlers/ (/opt/kit), whose archive reader it uses.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the kit's folder: its handlers/ package
from handlers.archive import BrokenArchive, read_archive  # noqa: E402
from handlers.store import served  # noqa: E402

MB = 2**20
FRONTEND_MB = 700
SHARED_MB = 300
WORKER_MB = 320
DECODE_BYTES_PER_PIXEL = 4.2
DECODE_OVERHEAD_MB = 12
DEFAULT_MAX_REQUEST_SIZE = 6_553_500  # TorchServe's default, when config.properties does not set one
CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


@dataclass(frozen=True)
class ServedModel:
    archive: str
    workers: int
    batch_size: int
    max_pixels: int
    model_bytes: int

    def need_mb(self, max_request_size: int) -> float:
        per_worker = (WORKER_MB + 3 * self.model_bytes / MB + DECODE_BYTES_PER_PIXEL * self.max_pixels / MB
                      + DECODE_OVERHEAD_MB + self.batch_size * max_request_size / MB)
        return self.workers * per_worker


def served_models(model_store: Path) -> tuple[list[ServedModel], list[str]]:
    """The archives' settings, and the archives that cannot be read (the health check names those)."""
    models, unreadable = [], []
    for path in served(model_store).values():  # the versions TorchServe starts with (handlers/store.py)
        try:
            archive = read_archive(path)
        except BrokenArchive:
            unreadable.append(path.name)
            continue
        models.append(ServedModel(path.name, archive.workers, int(archive.model_config.get("batchSize", 1)),
                                  archive.settings.max_pixels, archive.model_bytes))
    return models, unreadable


def max_request_size(config_file: Path) -> int:
    try:
        for line in config_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "max_request_size":
                return int(value.strip())
    except (OSError, ValueError):
        pass
    return DEFAULT_MAX_REQUEST_SIZE


def memory_limit_mb(files: tuple[Path, ...] = CGROUP_FILES) -> float | None:
    """The container's memory limit, or None when there is none."""
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or int(text) >= 2**60:  # cgroup v1 writes a huge number for "no limit"
            return None
        return int(text) / MB
    return None


def rollout_mb(models: list[ServedModel], request_size: int) -> float:
    """Room for a rollout: a second version of the largest model, loaded before the first is unregistered."""
    return max((model.need_mb(request_size) for model in models), default=0.0)


def need_mb(models: list[ServedModel], request_size: int) -> float:
    return (FRONTEND_MB + SHARED_MB + sum(model.need_mb(request_size) for model in models)
            + rollout_mb(models, request_size))


def verdict(model_store: Path, config_file: Path, limit_mb: float | None) -> tuple[bool, str]:
    models, _ = served_models(model_store)
    request_size = max_request_size(config_file)
    need = need_mb(models, request_size)
    workers = sum(model.workers for model in models)
    summary = (f"{len(models)} model(s), {workers} worker(s) in {model_store} need about {need:,.0f} MB "
               f"({FRONTEND_MB} frontend + {SHARED_MB} shared libraries + per model: workers x ({WORKER_MB} + 3 x "
               f"model file + {DECODE_BYTES_PER_PIXEL} B x max_pixels + {DECODE_OVERHEAD_MB} + batchSize x "
               f"{request_size / MB:.1f} MB request), and {rollout_mb(models, request_size):,.0f} MB for a "
               "rollout: the largest model's workers once more)")
    if limit_mb is None:
        return True, f"memory: {summary}; no container limit is set"
    if need <= limit_mb:
        return True, f"memory: {summary}, within the limit of {limit_mb:,.0f} MB"
    return False, (f"error: {summary}, but the container may use only {limit_mb:,.0f} MB: raise its limit "
                   f"(MEMORY_LIMIT={-(-need // 1024):.0f}g for docker compose), or serve fewer workers "
                   "(python -m export --workers 1) or fewer models")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-store", type=Path, default=Path("/home/serve/model_store"))
    p.add_argument("--config", type=Path, default=Path("/home/serve/config.properties"))
    p.add_argument("--limit-mb", type=float, default=None, help="instead of the cgroup's limit (for tests)")
    args = p.parse_args(own)
    ok, message = verdict(args.model_store, args.config, args.limit_mb if args.limit_mb else memory_limit_mb())
    print(message, file=sys.stdout if ok else sys.stderr, flush=True)
    if not ok:
        return 3
    if command:
        os.execvp(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
