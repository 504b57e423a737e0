"""Training benchmark: time to accuracy, the kit's default `make train` against the seeds' recipe.

Both run in the same benchmark, each in its own process as a user runs it, on the same
Fashion-MNIST training split, and are evaluated on the same validation and test images:

- the seeds' recipe (bench/seeds_recipe.py: SimpleCNN, PIL images through a DataLoader with
  ToTensor + Normalize, batch 64, SGD lr 0.001 momentum 0.9, 10 epochs, fp32);
- the kit's default: `python -m training` with every option at its default, as `make train` runs it,
  once for each of --seeds (0, 1, 2 by default): a seeded accuracy moves by a few tenths with the
  seed and between CPU models, so the target rests on the seeds' median, not on one draw.

Printed: the seeds' recipe's final test accuracy and training time; the kit's test accuracy for each
seed, their median and minimum, and its training time; the training time the kit needs to
reach the seeds' final accuracy, read from its per-epoch history, and the ratio. That curve is
the kit's *validation* accuracy after each epoch (the kit never looks at the test split while it
trains), so it is compared with the seeds' final *validation* accuracy: the same 6,000 images, both
models in eval mode. The kit's time at an epoch includes its per-epoch validation pass; the seeds'
time excludes their (untimed) evaluations, so the comparison leans, slightly, the seeds' way.

Targets: the kit's median test accuracy over the seeds is >= 93.0 % in less training time than the
seeds' recipe, and the seeds' final accuracy >= 10x faster. Wall-clock times drift on shared
machines: the recipes take turns in ABBA order (seeds, kit x seeds, kit x seeds, seeds with
--rounds 2), each kit run's time is divided by the seeds' recipe's time of its round, and the
median of these ratios is printed. Accuracies are deterministic for a seed on one machine: a
second round also checks that.

Run: make bench-train   (about 20-30 minutes on 2 CPU cores with the default 2 rounds and 3 seeds;
--rounds 1 halves it)
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


def run_kit_default(folder: Path, kit_args: list[str], seed: int) -> dict:
    subprocess.run([sys.executable, "-m", "training", "--artifacts-dir", str(folder), "--name", "bench",
                    "--seed", str(seed), *kit_args], cwd=ROOT, check=True)
    return json.loads((folder / "bench" / "metrics.json").read_text())


def time_to_reach(history: list[dict], accuracy: float) -> tuple[int, float] | None:
    """(epoch, cumulative training seconds) of the first epoch whose validation accuracy >= accuracy."""
    for row in history:
        if row["val_accuracy"] >= accuracy:
            return row["epoch"], row["seconds"]
    return None


def one_round(order: list[str], train_limit: int | None, kit_args: list[str], seeds: list[int]) -> dict:
    """The seeds' recipe and the kit at every seed, in `order` ("seeds" first or last)."""
    results = {"kit": {}}
    for recipe in order:
        for seed in ([None] if recipe == "seeds" else seeds):
            with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
                print(f"--- {recipe}" + (f", seed {seed}" if seed is not None else ""), flush=True)
                if recipe == "seeds":
                    results["seeds"] = run_seeds_recipe(Path(folder), train_limit)
                else:
                    results["kit"][seed] = run_kit_default(Path(folder), kit_args, seed)
    baseline = results["seeds"]
    runs = {}
    for seed, kit in results["kit"].items():
        reached = time_to_reach(kit["history"], baseline["val_accuracy"])
        runs[seed] = {"kit": kit, "reached": reached, "time_ratio": kit["train_seconds"] / baseline["train_seconds"],
                      "speedup": baseline["train_seconds"] / reached[1] if reached else None}
    return {"seeds": baseline, "runs": runs}


def report(rounds: list[dict]) -> list[str]:
    baseline, first = rounds[0]["seeds"], rounds[0]["runs"]
    seeds = list(first)
    kits = [r["runs"][seed] for r in rounds for seed in seeds]
    some = first[seeds[0]]["kit"]
    lines = [f"{'':46s}{'test acc':>10s}{'val acc':>10s}{'training s':>12s}  per round"]
    times = [r["seeds"]["train_seconds"] for r in rounds]
    label = f"seeds' recipe ({baseline['epochs']} epochs, fp32)"
    lines.append(f"{label:46s}"
                 f"{baseline['test_accuracy']:10.2%}{baseline['val_accuracy']:10.2%}"
                 f"{statistics.median(times):12.1f}  {', '.join(f'{t:.1f}' for t in times)}")
    for seed in seeds:
        record = first[seed]["kit"]
        times = [r["runs"][seed]["kit"]["train_seconds"] for r in rounds]
        label = f"kit default, seed {seed} ({record['epochs']} epochs, {record['precision']})"
        lines.append(f"{label:46s}{record['test_accuracy']:10.2%}{record['val_accuracy']:10.2%}"
                     f"{statistics.median(times):12.1f}  {', '.join(f'{t:.1f}' for t in times)}")
    for name, accuracies in [("seeds' recipe", {r["seeds"]["test_accuracy"] for r in rounds})] + [
            (f"kit seed {seed}", {r["runs"][seed]["kit"]["test_accuracy"] for r in rounds}) for seed in seeds]:
        if len(accuracies) > 1:
            lines.append(f"note: {name} test accuracy differed between rounds: {sorted(accuracies)}")
    accuracies = [first[seed]["kit"]["test_accuracy"] for seed in seeds]
    median = statistics.median(accuracies)
    ratios = [k["time_ratio"] for k in kits]
    ratio = statistics.median(ratios)
    met = median >= TARGET_ACCURACY and ratio < 1
    lines.append(f"kit default over seeds {', '.join(map(str, seeds))}: test accuracy median {median:.2%}, min "
                 f"{min(accuracies):.2%}, max {max(accuracies):.2%} ({some['epochs']} epochs)")
    lines.append(f"kit training time / seeds' training time: {ratio:.2f} (median of {len(ratios)}: "
                 f"{', '.join(f'{r:.2f}' for r in ratios)}); kit median test accuracy {median:.2%}: target >= "
                 f"{TARGET_ACCURACY:.1%} in less time than the seeds: {'met' if met else 'NOT met'}")
    missed = [seed for seed in seeds if first[seed]["reached"] is None]
    if missed:
        lines.append(f"the kit never reached the seeds' final validation accuracy {baseline['val_accuracy']:.2%} "
                     f"at seed(s) {', '.join(map(str, missed))}: NOT met")
        return lines
    epochs = [first[seed]["reached"][0] for seed in seeds]
    speedups = [k["speedup"] for k in kits]
    speedup = statistics.median(speedups)
    lines.append(f"time to the seeds' final accuracy (validation {baseline['val_accuracy']:.2%}; test "
                 f"{baseline['test_accuracy']:.2%}): the kit's validation accuracy reaches it after epoch "
                 f"{'/'.join(map(str, epochs))} (seeds {', '.join(map(str, seeds))}) at "
                 f"{statistics.median(k['reached'][1] for k in kits):.1f} s (median)")
    lines.append(f"  speed-up {speedup:.1f}x (median of {len(speedups)}: {', '.join(f'{s:.1f}x' for s in speedups)}; "
                 f"target >= {TARGET_SPEEDUP:.0f}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds of both recipes (%(default)s)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="both recipes train on the first N images only (a quick check of the benchmark itself)")
    p.add_argument("--seeds", default="0,1,2", help="the kit's runs: one per seed (%(default)s)")
    p.add_argument("--kit-args", default="", help="extra options for python -m training, e.g. '--epochs 2'")
    args = p.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    kit_args = args.kit_args.split() + (["--train-limit", str(args.train_limit)] if args.train_limit else [])
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, CPU bf16: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, load average {load:.1f} at the start", flush=True)
    rounds = []
    for index in range(args.rounds):
        order = ["seeds", "kit"] if index % 2 == 0 else ["kit", "seeds"]
        rounds.append(one_round(order, args.train_limit, kit_args, seeds))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end ({load:.1f} at the start; above "
          f"{os.cpu_count()} means other processes shared the cores and times are contended)")
    print("\n".join(report(rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
