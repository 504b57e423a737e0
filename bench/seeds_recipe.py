"""The seeds' recipe, as the tutorials the project grew from train: the baseline of `make bench-train`.

SimpleCNN (two conv + ReLU + max-pool blocks, two linear layers), a DataLoader over PIL images
with ToTensor + Normalize per sample, batch 64, shuffled, SGD lr 0.001 momentum 0.9, plain
cross-entropy, fp32, 10 epochs, a running loss printed every 100 steps (so `loss.item()` every
step), as in the seeds' "Implementing CNNs in PyTorch". It trains on the kit's training split
(Fashion-MNIST's 60,000 training images minus the kit's 10 % validation split), so both recipes
see the same images and are compared on the same validation and test images.

After each epoch the clock stops and the model is evaluated on the validation and the test
split (the seeds evaluate once at the end; the evaluation is not counted as training time).
Writes a JSON record: per-epoch cumulative training seconds and accuracies, final accuracies.

Run: python bench/seeds_recipe.py --out seeds.json   (about 2-7 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import data as datasets  # noqa: E402
from training.loop import batches, evaluate, per_channel  # noqa: E402
from training.models import build  # noqa: E402


class PILImages(torch.utils.data.Dataset):
    """As torchvision's FashionMNIST does it: one PIL image per item, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images[:, 0], labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index].numpy(), mode="L")), int(self.labels[index])


def load_data(train_limit: int | None) -> tuple:
    """The kit's own Fashion-MNIST splits (seed 0) and the training split's mean/std."""
    data = datasets.load("fashion-mnist", ROOT / "data", 0.1, 0.1, 0, download=False)
    if train_limit is not None:
        data.train = data.train.subset(torch.arange(min(train_limit, len(data.train))))
    mean, std = datasets.channel_stats(batches(data.train, 4096, torch.device("cpu"), None, data.shape), 1)
    return data, mean, std


def train_seeds_recipe(epochs: int = 10, train_limit: int | None = None, log=print) -> dict:
    torch.manual_seed(0)
    data, mean, std = load_data(train_limit)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_loader = torch.utils.data.DataLoader(PILImages(data.train.images, data.train.labels, transform),
                                               batch_size=64, shuffle=True)
    model = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    mean_t, std_t, cpu = per_channel(mean), per_channel(std), torch.device("cpu")

    history, train_seconds = [], 0.0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if (i + 1) % 100 == 0:
                log(f"Epoch [{epoch}/{epochs}], Step [{i + 1}/{len(train_loader)}], Loss: {running_loss / 100:.4f}")
                running_loss = 0.0
        train_seconds += time.perf_counter() - started
        # not timed: ToTensor + Normalize computes exactly the kit's normalize(), so one evaluation serves both
        _, val_accuracy, _ = evaluate(model, data.val, mean_t, std_t, cpu, data.shape, workers=0)
        _, test_accuracy, _ = evaluate(model, data.test, mean_t, std_t, cpu, data.shape, workers=0)
        history.append({"epoch": epoch, "seconds": round(train_seconds, 2), "val_accuracy": val_accuracy,
                        "test_accuracy": test_accuracy})
    return {"recipe": "seeds", "epochs": epochs, "train_seconds": round(train_seconds, 2),
            "val_accuracy": history[-1]["val_accuracy"], "test_accuracy": history[-1]["test_accuracy"],
            "history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON record")
    p.add_argument("--epochs", type=int, default=10, help="(%(default)s, as the seeds)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images only (quick runs)")
    args = p.parse_args()
    record = train_seeds_recipe(args.epochs, args.train_limit)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
