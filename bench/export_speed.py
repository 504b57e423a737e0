"""In-process inference benchmark (issue: export): eager vs TorchScript vs ONNX Runtime on this CPU.

Prints batch-1 latency (median) and batch-64 throughput (median) for each format, measured in
interleaved rounds in one run (these machines are noisy), with ratios to eager. Inputs are real
normalized test images. Target: ONNX Runtime >= 2x eager at batch 1.

Needs `make train export` first. Run: make bench-export   (about 1 minute)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import parity  # noqa: E402
from export.checkpoint import load_trained  # noqa: E402
from export.data import load_run_data  # noqa: E402
from export.run import test_images  # noqa: E402
from handlers.spec import Spec  # noqa: E402


def runners(out_dir: Path) -> dict:
    """The parity gate's runners: each format loaded back from its file."""
    model, _ = load_trained(out_dir)
    return {"eager": parity.eager_runner(model),
            "torchscript": parity.torchscript_runner(out_dir / "model.torchscript.pt"),
            "onnxruntime": parity.onnxruntime_runner(out_dir / "model.onnx")}


def time_calls(run, batch: np.ndarray, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    started = time.perf_counter()
    for _ in range(calls):
        run(batch)
    return (time.perf_counter() - started) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement (%(default)s)")
    args = p.parse_args()
    out_dir = ROOT / "artifacts" / args.name
    if not (out_dir / "model.onnx").is_file():
        raise SystemExit(f"error: run `make train export NAME={args.name}` first")
    spec = Spec.read(out_dir / "spec.json")
    images, _, _ = test_images(load_run_data(out_dir), spec)  # the run's own first 64 test images, normalized
    formats = runners(out_dir)
    for run in formats.values():  # warm-up: first calls allocate and optimize
        for batch in (images[:1], images):
            time_calls(run, batch, 20)

    latency = {name: [] for name in formats}
    throughput = {name: [] for name in formats}
    for _ in range(args.rounds):
        for name, run in formats.items():
            latency[name].append(time_calls(run, images[:1], 100))
            throughput[name].append(len(images) / time_calls(run, images, 10))

    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}; model {spec.arch} "
          f"{'x'.join(map(str, spec.input.size))}; "
          f"medians of {args.rounds} interleaved rounds")
    print(f"{'format':<13}{'batch-1 latency':>17}{'x eager':>9}{'batch-64 images/s':>19}{'x eager':>9}")
    eager_latency = statistics.median(latency["eager"])
    eager_throughput = statistics.median(throughput["eager"])
    for name in formats:
        lat, thr = statistics.median(latency[name]), statistics.median(throughput[name])
        print(f"{name:<13}{lat * 1e6:>14.0f} us{eager_latency / lat:>8.1f}x{thr:>19.0f}{thr / eager_throughput:>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
