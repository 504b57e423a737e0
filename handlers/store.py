"""The model store's layout: every version of every model side by side, and which one is live.

  model_store/<name>.v<N>.mar    version N of model <name> (make export mints N: 1, 2, 3, ...)
  model_store/live.json          {"<name>": {"live": N, "previous": M}}: what the last rollout or
                                 rollback left live, and what was live before it (make rollback)

Archives sit at the top level because TorchServe registers an archive by its file name in the store
(it refuses paths). `served` is what a server starts with: per name, the live version where one is
recorded and its archive is present, else the newest. An archive named without a version
(<name>.mar, copied in by hand) is served under its name as it is. KIT_LIVE_FILE moves the live
record elsewhere (the container's store is read-only: docker-compose.yml gives it a volume).

  python -m handlers.store --models model_store    what `make serve` passes to torchserve --models
Plain standard library: the servers (make serve, the KServe adapter, the container) read it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

VERSIONED = re.compile(r"^(?P<name>.+)\.v(?P<version>[1-9][0-9]*)\.mar$")
LIVE_FILE = "live.json"


def archive_path(model_store: Path, name: str, version: int) -> Path:
    return model_store / f"{name}.v{version}.mar"


def versions(model_store: Path) -> dict[str, dict[int, Path]]:
    """Every versioned archive of the store: name -> {version: path}, versions in ascending order."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(model_store.glob("*.mar")):
        match = VERSIONED.match(path.name)
        if match:
            found.setdefault(match["name"], {})[int(match["version"])] = path
    return {name: dict(sorted(by_version.items())) for name, by_version in sorted(found.items())}


def live_file(model_store: Path) -> Path:
    return Path(os.environ.get("KIT_LIVE_FILE") or model_store / LIVE_FILE)


def read_live(model_store: Path) -> dict[str, dict]:
    """The live record, {} where none was written (or it is unreadable: then the newest versions serve)."""
    try:
        record = json.loads(live_file(model_store).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_live(model_store: Path, name: str, live: int, previous: int | None) -> Path:
    """Records `live` (and the version it replaced) for `name`, atomically."""
    path = live_file(model_store)
    record = read_live(model_store)
    record[name] = {"live": live, "previous": previous}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
    return path


def recorded_live(model_store: Path, name: str) -> int | None:
    entry = read_live(model_store).get(name)
    live = entry.get("live") if isinstance(entry, dict) else None
    return live if isinstance(live, int) else None


def served(model_store: Path) -> dict[str, Path]:
    """What a server starts with: name -> archive (the live version, else the newest, else an unversioned one)."""
    chosen = {}
    for name, by_version in versions(model_store).items():
        live = recorded_live(model_store, name)
        chosen[name] = by_version.get(live) or by_version[max(by_version)]
    for path in sorted(model_store.glob("*.mar")):
        if not VERSIONED.match(path.name):
            chosen.setdefault(path.stem, path)
    return dict(sorted(chosen.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m handlers.store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, metavar="MODEL_STORE", required=True,
                   help="print NAME=FILE for each served archive, as torchserve --models takes them")
    args = p.parse_args(argv)
    chosen = served(args.models)
    if not chosen:
        print(f"error: no archives in {args.models}/: run make train export first", file=sys.stderr)
        return 1
    print(" ".join(f"{name}={path.name}" for name, path in chosen.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
