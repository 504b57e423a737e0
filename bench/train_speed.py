"""Training benchmark: time to accuracy, the kit's default `make train` against the seeds' recipe.

Both run in the same benchmark, each in its own process as a user runs it, on the same
Fashion-MNIST training split, and are evaluated on the same validation and test images:

- the seeds' recipe (bench/seeds_recipe.py: SimpleCNN, PIL images through a DataLoader with
  ToTensor + Normalize, batch 64, SGD lr 0.001 momentum 0.9, 10 epochs, fp32);
- the kit's default: `python -m training` with every option at its default, as `make train` runs it.

Printed: each one's final test accuracy and training time; the training time the kit needs to
reach the seeds' final accuracy, read from its per-epoch history, and the ratio. That curve is
the kit's *validation* accuracy after each epoch (the kit never looks at the test split while it
trains), so it is compared with the seeds' final *validation* accuracy: the same 6,000 images, both
models in eval mode. The kit's time at an epoch includes its per-epoch validation pass; the seeds'
time excludes their (untimed) evaluations, so the comparison leans, slightly, the seeds' way.

Targets: the kit reaches >= 93.0 % test accuracy in less training time than the seeds' recipe,
and the seeds' final accuracy >= 10x faster. Wall-clock times drift on shared machines: the
recipes take turns in ABBA order (seeds, kit, kit, seeds with --rounds 2), ratios are per round
and their median is printed. Accuracies are deterministic for a seed on one machine: a second
round also checks that.

Run: make bench-train   (about 10-20 minutes on 2 CPU cores with the default 2 rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.93
TARGET_SPEEDUP = 10.0


def run_seeds_recipe(folder: Path, train_limit: int | None) -> dict:
    out = folder / "seeds.json"
    command = [sys.executable, str(ROOT / "bench" / "seeds_recipe.py"), "--out", str(out)]
    if train_limit:
        command += ["--train-limit", str(train_limit)]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # its running loss: not shown
    return json.loads(out.read_text())


def run_kit_default(folder: Path, kit_args: list[str]) -> dict:
    subprocess.run([sys.executable, "-m", "training", "--artifacts-dir", str(folder), "--name", "bench",
                    *kit_args], cwd=ROOT, check=True)
    return json.loads((folder / "bench" / "metrics.json").read_text())


def time_to_reach(history: list[dict], accuracy: float) -> tuple[int, float] | None:
    """(epoch, cumulative training seconds) of the first epoch whose validation accuracy >= accuracy."""
    for row in history:
        if row["val_accuracy"] >= accuracy:
            return row["epoch"], row["seconds"]
    return None


def one_round(order: list[str], train_limit: int | None, kit_args: list[str]) -> dict:
    results = {}
    for recipe in order:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
            print(f"--- {recipe}", flush=True)
            results[recipe] = (run_seeds_recipe(Path(folder), train_limit) if recipe == "seeds"
                               else run_kit_default(Path(folder), kit_args))
    seeds, kit = results["seeds"], results["kit"]
    reached = time_to_reach(kit["history"], seeds["val_accuracy"])
    return {"seeds": seeds, "kit": kit, "reached": reached,
            "time_ratio": kit["train_seconds"] / seeds["train_seconds"],
            "speedup": seeds["train_seconds"] / reached[1] if reached else None}


def report(rounds: list[dict]) -> list[str]:
    seeds, kit, first = rounds[0]["seeds"], rounds[0]["kit"], rounds[0]
    lines = [f"{'':34s}{'test acc':>10s}{'val acc':>10s}{'training s':>12s}  per round"]
    for name, record, label in (("seeds", seeds, f"seeds' recipe ({seeds['epochs']} epochs, fp32)"),
                                ("kit", kit, f"kit default ({kit['epochs']} epochs, {kit['precision']})")):
        times = [r[name]["train_seconds"] for r in rounds]
        lines.append(f"{label:34s}{record['test_accuracy']:10.2%}{record['val_accuracy']:10.2%}"
                     f"{statistics.median(times):12.1f}  {', '.join(f'{t:.1f}' for t in times)}")
    for name in ("seeds", "kit"):
        accuracies = {r[name]["test_accuracy"] for r in rounds}
        if len(accuracies) > 1:
            lines.append(f"note: {name} test accuracy differed between rounds: {sorted(accuracies)}")
    ratios = [r["time_ratio"] for r in rounds]
    ratio = statistics.median(ratios)
    met = kit["test_accuracy"] >= TARGET_ACCURACY and ratio < 1
    lines.append(f"kit training time / seeds' training time: {ratio:.2f} (rounds: "
                 f"{', '.join(f'{r:.2f}' for r in ratios)}); kit test accuracy "
                 f"{kit['test_accuracy']:.2%}: target >= {TARGET_ACCURACY:.1%} in less time than the seeds: "
                 f"{'met' if met else 'NOT met'}")
    if first["reached"] is None:
        lines.append(f"the kit never reached the seeds' final validation accuracy {seeds['val_accuracy']:.2%}: "
                     "NOT met")
        return lines
    epoch, _ = first["reached"]
    speedups = [r["speedup"] for r in rounds]
    speedup = statistics.median(speedups)
    lines.append(f"time to the seeds' final accuracy (validation {seeds['val_accuracy']:.2%}; test "
                 f"{seeds['test_accuracy']:.2%}): the kit's validation accuracy reaches it after epoch {epoch} "
                 f"({kit['history'][epoch - 1]['val_accuracy']:.2%}) at "
                 f"{statistics.median(r['reached'][1] for r in rounds):.1f} s")
    lines.append(f"  speed-up {speedup:.1f}x (rounds: {', '.join(f'{s:.1f}x' for s in speedups)}; target >= "
                 f"{TARGET_SPEEDUP:.0f}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds of both recipes (%(default)s)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="both recipes train on the first N images only (a quick check of the benchmark itself)")
    p.add_argument("--kit-args", default="", help="extra options for python -m training, e.g. '--epochs 2'")
    args = p.parse_args()
    kit_args = args.kit_args.split() + (["--train-limit", str(args.train_limit)] if args.train_limit else [])
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, CPU bf16: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, load average {load:.1f} at the start", flush=True)
    rounds = []
    for index in range(args.rounds):
        order = ["seeds", "kit"] if index % 2 == 0 else ["kit", "seeds"]
        rounds.append(one_round(order, args.train_limit, kit_args))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end ({load:.1f} at the start; above "
          f"{os.cpu_count()} means other processes shared the cores and times are contended)")
    print("\n".join(report(rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
