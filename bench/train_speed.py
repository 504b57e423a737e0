"""Training benchmark: prints, from one run on this machine,

1. the default `make train` (python -m training, all defaults): test accuracy and training time,
   against the targets (>= 92.0 % on the 10,000 Fashion-MNIST test images within 240 s);
2. training images/second of the kit's loop against a seed-style loop on the same model
   (simple-cnn), data and device, and their ratio (target >= 8x). The seed-style loop is the
   seeds' way: a data set of PIL images -> DataLoader(batch 64, shuffle) -> ToTensor + Normalize
   per sample -> SGD. Each loop runs in its own process, as a user runs it (neither inherits the
   other's allocator or thread-pool state); they take turns in alternating rounds and the medians
   are printed, because this machine's speed drifts. The seed-style loop's model step is also
   timed alone, which shows how much of the ratio its data pipeline explains and how much must
   come from the kit's step.

Run: make bench-train   (about 6 minutes on a 2-core CPU; --skip-default for part 2 only)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import data as datasets  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.loop import batches, make_optimizer, make_scheduler, per_channel, pick_autocast_dtype  # noqa: E402
from training.models import build  # noqa: E402
from training.run import train_epoch  # noqa: E402


class PILImages(torch.utils.data.Dataset):
    """As torchvision's FashionMNIST does it: one PIL image per item, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images[:, 0], labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index].numpy(), mode="L")), int(self.labels[index])


class SeedStyleLoop:
    """The seeds' way: PIL images -> DataLoader(batch 64, shuffle) -> ToTensor + Normalize per sample
    -> simple-cnn in fp32 -> SGD, printing a running loss (hence loss.item() every step)."""

    def __init__(self, data, mean, std):
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        self.loader = torch.utils.data.DataLoader(PILImages(data.train.images, data.train.labels, transform),
                                                  batch_size=64, shuffle=True)
        self.model = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.running_loss = 0.0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = self.criterion(self.model(images), labels)
        loss.backward()
        self.optimizer.step()
        self.running_loss += loss.item()

    def batches(self, images: int):
        seen = 0
        for batch in self.loader:
            yield batch
            seen += len(batch[1])
            if seen >= images:
                return

    def seconds_per_image(self, images: int) -> tuple[float, float]:
        """(whole loop, model step alone on the same batches collated beforehand), seconds per image."""
        for batch in self.batches(640):  # warm-up
            self.step(*batch)
        started = time.perf_counter()
        for batch in self.batches(images):
            self.step(*batch)
        whole = (time.perf_counter() - started) / images
        collated = list(self.batches(images))
        started = time.perf_counter()
        for batch in collated:
            self.step(*batch)
        return whole, (time.perf_counter() - started) / images


class KitLoop:
    """The kit's own training epoch (training.run.train_epoch) with its defaults, on simple-cnn."""

    def __init__(self, data, mean, std):
        self.data, self.device = data, torch.device("cpu")
        self.config = TrainConfig(model="simple-cnn", epochs=1, workers=0)
        self.autocast_dtype = pick_autocast_dtype(self.config.precision, self.device)
        self.model = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10).to(
            memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.config, self.model)
        self.scheduler = make_scheduler(self.config, self.optimizer, 10**6)  # never runs out across rounds
        self.generator = torch.Generator().manual_seed(0)
        self.mean, self.std = per_channel(mean), per_channel(std)
        warm = datasets.Data(data.dataset, data.class_names, data.shape, data.train.subset(torch.arange(2048)),
                             data.val, data.test, data.flip_ok)
        self.epoch(warm)

    def epoch(self, data) -> tuple[int, float]:
        _, _, seen, seconds = train_epoch(self.model, self.optimizer, self.scheduler, data, self.config, self.mean,
                                          self.std, self.generator, self.device, self.autocast_dtype, 1)
        return seen, seconds

    def seconds_per_image(self) -> float:
        """One whole epoch over the training split."""
        seen, seconds = self.epoch(self.data)
        return seconds / seen

    def describe(self) -> str:
        return (f"uint8 tensors, batch {self.config.batch_size}, "
                f"{'bf16 autocast' if self.autocast_dtype else 'fp32'}, channels_last, augment {self.config.augment}")


def fashion_mnist() -> tuple:
    data = datasets.load("fashion-mnist", ROOT / "data", 0.1, 0.1, 0, download=False)
    mean, std = datasets.channel_stats(batches(data.train, 4096, torch.device("cpu"), None, data.shape), 1)
    return data, mean, std


def loop_process(kind: str, connection) -> None:
    """One loop in a process of its own, as a user runs it; one round per request."""
    loop = (SeedStyleLoop if kind == "seed" else KitLoop)(*fashion_mnist())
    connection.send(loop.describe() if kind == "kit" else "")
    while (images := connection.recv()) is not None:  # the kit's round is one whole epoch
        connection.send(loop.seconds_per_image(images) if kind == "seed" else (loop.seconds_per_image(),))


def throughput_comparison(rounds: int, seed_images: int) -> list[str]:
    """Each loop in its own process, measured one at a time in alternating rounds (this machine's
    speed drifts); medians. Returns the lines to print."""
    context = multiprocessing.get_context("spawn")
    pipes, processes = {}, []
    for kind in ("seed", "kit"):
        pipes[kind], child = context.Pipe()
        processes.append(context.Process(target=loop_process, args=(kind, child), daemon=True))
        processes[-1].start()
    try:
        described = {kind: pipe.recv() for kind, pipe in pipes.items()}["kit"]
        times = {kind: [] for kind in pipes}
        for _ in range(rounds):
            for kind, pipe in pipes.items():
                pipe.send(seed_images)
                times[kind].append(pipe.recv())
    finally:
        for pipe in pipes.values():
            pipe.send(None)
        for process in processes:
            process.join(timeout=30)
    whole, kit = (statistics.median(t[0] for t in times[kind]) for kind in ("seed", "kit"))
    model_step = statistics.median(t[1] for t in times["seed"])
    ratios = sorted(seed_round[0] / kit_round[0] for seed_round, kit_round in zip(*times.values(), strict=True))
    return [
        f"training throughput, simple-cnn on Fashion-MNIST, cpu, median of {rounds} alternating rounds:",
        f"  seed-style loop (PIL + DataLoader(64) + per-sample ToTensor/Normalize, fp32 SGD) {1 / whole:8.0f} img/s",
        f"  kit loop ({described}) {1 / kit:8.0f} img/s",
        f"  ratio {whole / kit:.1f}x (rounds: {', '.join(f'{r:.1f}x' for r in ratios)}; target >= 8x)",
        "where the time goes, in us per image:",
        f"  seed-style loop {whole * 1e6:.0f}: its model step alone (fp32, batch 64, on batches collated "
        f"beforehand) {model_step * 1e6:.0f}, its data pipeline the other {1 - model_step / whole:.0%}",
        f"  8x needs the kit's whole step within {whole / 8 * 1e6:.0f}, {8 * model_step / whole:.1f}x faster than "
        f"the seed's model step; it takes {kit * 1e6:.0f} ({model_step / kit:.1f}x faster)",
    ]


def default_make_train() -> dict:
    with tempfile.TemporaryDirectory() as artifacts:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "training", "--artifacts-dir", artifacts, "--name", "bench"],
                       cwd=ROOT, check=True)
        wall = time.perf_counter() - started
        metrics = json.loads((Path(artifacts) / "bench" / "metrics.json").read_text())
    return {"wall_seconds": wall, **metrics}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-default", action="store_true", help="only the throughput comparison")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both loops (%(default)s)")
    p.add_argument("--seed-images", type=int, default=12800,
                   help="images per round for the seed-style loop (%(default)s); the kit's round is one epoch")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    lines = []
    if not args.skip_default:
        result = default_make_train()
        lines.append(f"default make train ({result['precision']}, {result['epochs']} epochs): test accuracy "
                     f"{result['test_accuracy']:.2%} (target >= 92.0 %), training {result['train_seconds']:.0f} s "
                     f"(target <= 240 s), whole command {result['wall_seconds']:.0f} s")
    lines += throughput_comparison(args.rounds, args.seed_images)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
