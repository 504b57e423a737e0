"""Training benchmark: prints, from one run on this machine,

1. the default `make train` (python -m training, all defaults): test accuracy and training time,
   against the targets (>= 92.0 % on the 10,000 Fashion-MNIST test images within 240 s);
2. training images/second of the kit's loop against a seed-style loop on the same model
   (simple-cnn), data and device, and their ratio (target >= 8x). The seed-style loop is the
   seeds' way: a data set of PIL images -> DataLoader(batch 64, shuffle) -> ToTensor + Normalize
   per sample -> SGD.

Run: make bench-train   (about 5 minutes on a 2-core CPU; --skip-default for part 2 only)
"""

from __future__ import annotations

import argparse
import json
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


def seed_style_images_per_second(data, mean, std, seconds: float, max_images: int) -> float:
    loader = torch.utils.data.DataLoader(
        PILImages(data.train.images, data.train.labels,
                  transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])),
        batch_size=64, shuffle=True)
    model = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    seen, started, running_loss = 0, None, 0.0
    for step, (images, labels) in enumerate(loader):
        if step == 10:  # warm-up done: start the clock
            seen, started = 0, time.perf_counter()
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # the seeds print a running loss
        seen += len(labels)
        if started and (time.perf_counter() - started > seconds or seen >= max_images):
            break
    return seen / (time.perf_counter() - started)


def kit_images_per_second(data, mean, std) -> tuple[float, str]:
    config = TrainConfig(model="simple-cnn", epochs=1, workers=0)
    device = torch.device("cpu")
    autocast_dtype = pick_autocast_dtype(config.precision, device)
    model = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10).to(
        memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, len(data.train) // config.batch_size + 20)  # + warm-up steps
    generator = torch.Generator().manual_seed(0)
    mean_t, std_t = per_channel(mean), per_channel(std)
    # warm-up on a slice, then one timed epoch over the whole training split
    warm = datasets.Data(data.dataset, data.class_names, data.shape, data.train.subset(torch.arange(2048)),
                         data.val, data.test, data.flip_ok)
    train_epoch(model, optimizer, scheduler, warm, config, mean_t, std_t, generator, device, autocast_dtype, 1)
    _, _, seen, seconds = train_epoch(model, optimizer, scheduler, data, config, mean_t, std_t, generator, device,
                                      autocast_dtype, 1)
    how = (f"uint8 tensors, batch {config.batch_size}, {'bf16 autocast' if autocast_dtype else 'fp32'}, "
           f"channels_last, augment {config.augment}")
    return seen / seconds, how


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
    p.add_argument("--seconds", type=float, default=30, help="time bound of the seed-style loop (%(default)s)")
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
    data = datasets.load("fashion-mnist", ROOT / "data", 0.1, 0.1, 0, download=False)
    mean, std = datasets.channel_stats(batches(data.train, 4096, torch.device("cpu"), None, data.shape), 1)
    seed = seed_style_images_per_second(data, mean, std, args.seconds, 30000)
    kit, how = kit_images_per_second(data, mean, std)
    lines += [
        "training throughput, simple-cnn on Fashion-MNIST, cpu:",
        f"  seed-style loop (PIL + DataLoader(64) + per-sample ToTensor/Normalize, fp32 SGD) {seed:8.0f} img/s",
        f"  kit loop ({how}) {kit:8.0f} img/s",
        f"  ratio {kit / seed:.1f}x (target >= 8x)",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
