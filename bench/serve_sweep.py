"""Which serving settings to write into the archives: workers x batchSize x maxBatchDelay, measured.

For each combination it packs the run's ONNX model (FP32, and INT8 where export wrote one) with
export.archive.build_archive, packs the no-op handler with the same model-config, serves them in
one TorchServe, and loads each with wrk at 1 and 32 clients in alternating rounds. It prints
requests/s, median latency and the kit/no-op ratio per combination. The kit's defaults
(export.archive.ServingConfig) are chosen from this table by the kit's own throughput at 32 clients
and latency at 1 client, never by the ratio (a setting that slows the no-op would flatter it).

Needs `make train export` first and wrk. Run: make bench-serve-sweep   (about 1 minute per combination)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import harness  # noqa: E402
from serve_load import LUA, Target, noop_archive, wrk  # noqa: E402

from export.archive import ServingConfig, build_archive  # noqa: E402
from export.data import load_run_data  # noqa: E402
from training.samples import save_png  # noqa: E402


def measure(out_dir: Path, config: ServingConfig, image: Path, seconds: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        store = scratch / "store"
        store.mkdir()
        models = {"kit": "kit", "noop": "noop"}
        kit = build_archive("kit", out_dir / "model.onnx", out_dir / "spec.json", "onnxruntime", store, config)
        noop_archive(kit, store, "noop")
        if (out_dir / "model.int8.onnx").is_file():
            build_archive("int8", out_dir / "model.int8.onnx", out_dir / "spec.json", "onnxruntime", store, config)
            models["int8"] = "int8"
        script = scratch / "post.lua"
        script.write_text(LUA)
        server = harness.start(store, scratch / "ts", list(models.values()))
        try:
            targets = [Target(key, key, f"{server.inference}/predictions/{name}", image)
                       for key, name in models.items()]
            for target in targets:
                wrk(target, 8, 1, script)
            runs: dict = {}
            for round_index in range(rounds):
                for concurrency in (1, 32):
                    for target in targets if round_index % 2 == 0 else targets[::-1]:
                        runs.setdefault((target.key, concurrency), []).append(wrk(target, concurrency, seconds, script))
        finally:
            server.stop()
    return {key: {"rps": statistics.median(r["requests_per_second"] for r in rows),
                  "p50": statistics.median(r["p50_ms"] for r in rows),
                  "errors": sum(r["errors"] for r in rows)} for key, rows in runs.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batch-sizes", default="8,16,32")
    p.add_argument("--delays", default="0,1,2", help="maxBatchDelay values, ms")
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    out_dir = ROOT / "artifacts" / args.name
    if not (out_dir / "model.onnx").is_file():
        raise SystemExit(f"error: run `make train export NAME={args.name}` first")
    test = load_run_data(out_dir)[0].test
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "test-image.png"
        save_png(test.images[0], image)
        print(f"{'workers':>7}{'batch':>6}{'delay':>6} | {'kit c=32':>9}{'noop c=32':>10}{'ratio':>7}{'int8 c=32':>10}"
              f" | {'kit p50 c=1':>12}{'noop p50':>9}{'added':>7}{'int8 p50':>9} | errors", flush=True)
        combinations = itertools.product(*(map(int, value.split(",")) for value in
                                           (args.workers, args.batch_sizes, args.delays)))
        for workers, batch_size, delay in combinations:
            config = replace(ServingConfig(), workers=workers, batch_size=batch_size, max_batch_delay_ms=delay)
            m = measure(out_dir, config, image, args.seconds, args.rounds)
            int8 = ("int8", 32) in m
            kit, noop = m["kit", 32]["rps"], m["noop", 32]["rps"]
            kit_p50, noop_p50 = m["kit", 1]["p50"], m["noop", 1]["p50"]
            print(f"{workers:>7}{batch_size:>6}{delay:>6} | {kit:>9.0f}{noop:>10.0f}{kit / noop:>7.2f}"
                  f"{m['int8', 32]['rps'] if int8 else float('nan'):>10.0f} | {kit_p50:>12.2f}{noop_p50:>9.2f}"
                  f"{kit_p50 - noop_p50:>7.2f}{m['int8', 1]['p50'] if int8 else float('nan'):>9.2f}"
                  f" | {sum(v['errors'] for v in m.values())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
