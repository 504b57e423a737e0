"""Where a TorchServe worker's time goes under load: py-spy samples one worker of an archive while wrk
loads it at 32 clients, and the script prints the share of samples in each function (inclusive),
TorchServe's own code and the kit's side by side.

Needs `make train export` first and wrk. Run: make profile-serve [ARCHIVE=fashion-mnist-int8]
(about 30 s; py-spy needs ptrace rights over the worker: root, or kernel.yama.ptrace_scope=0)
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import harness  # noqa: E402
from serve_load import LUA, noop_archive  # noqa: E402

from export.data import load_run_data  # noqa: E402
from handlers.store import served as live_archives  # noqa: E402
from training.samples import save_png  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"


def shares(raw: str, top: int) -> list[tuple[float, str]]:
    """py-spy's raw (collapsed) stacks -> the top functions by inclusive share of samples."""
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        names = {frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                 for frame in stack.split(";")}
        for name in names:
            inclusive[name] += int(count)
    return [(count / total, name) for name, count in inclusive.most_common(top)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--archive", default="", help="archive in model_store/ to profile (NAME); 'noop' for the no-op")
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    if not PY_SPY.is_file() or shutil.which("wrk") is None:
        raise SystemExit("error: needs py-spy (make venv) and wrk (apt-get install wrk)")
    live = live_archives(ROOT / "model_store")  # the live version of each name, as make serve serves it
    kit_archive = live.get(args.name)
    if kit_archive is None:
        raise SystemExit(f"error: run `make train export NAME={args.name}` first")
    archive = args.archive or args.name
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        if archive == "noop":
            noop_archive(kit_archive, store, "noop")
        elif archive in live:
            shutil.copy(live[archive], store)
        else:
            raise SystemExit(f"error: no model_store/{archive}.mar")
        image = scratch / "test-image.png"
        test = load_run_data(ROOT / "artifacts" / args.name)[0].test
        save_png(test.images[0], image)
        (scratch / "post.lua").write_text(LUA)
        server = harness.start(store, scratch / "ts", [archive])
        try:
            workers = json.loads(harness.http("GET", f"{server.management}/models/{archive}")[1])[0]["workers"]
            load = subprocess.Popen(["wrk", "-t2", "-c32", f"-d{args.seconds + 4}s", "-s", str(scratch / "post.lua"),
                                     f"{server.inference}/predictions/{archive}"], stdout=subprocess.PIPE, text=True,
                                    env={"WRK_BODY": str(image), "WRK_CONTENT_TYPE": "image/png",
                                         "PATH": "/usr/bin:/bin"})
            time.sleep(2)
            profile = scratch / "worker.txt"
            subprocess.run([str(PY_SPY), "record", "--pid", str(workers[0]["pid"]), "--duration", str(args.seconds),
                            "--rate", "200", "--format", "raw", "--output", str(profile), "--nonblocking"],
                           check=True, capture_output=True)
            summary = [line for line in load.communicate()[0].splitlines() if "Requests/sec" in line]
        finally:
            server.stop()
        print(f"{archive}: one worker of {len(workers)} sampled for {args.seconds} s at 32 clients; "
              f"{summary[0].strip() if summary else ''}")
        for share, name in shares(profile.read_text(), args.top):
            print(f"{share:7.1%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
