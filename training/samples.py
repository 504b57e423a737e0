"""Write a few test images of a data set as PNG files, to send to the endpoint:
`python -m training.samples` (or `make samples`) -> samples/0-ankle-boot.png, ...
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from training.data import load
from training.errors import UserError


def write_samples(dataset: str, count: int, out_dir: Path, data_dir: Path) -> list[Path]:
    data = load(dataset, data_dir, 0.1, 0.1, 0, download=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(data.test))):
        label = data.class_names[int(data.test.labels[index])]
        path = out_dir / f"{index}-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.png"
        paths.append(save_png(data.test.images[index], path))
    return paths


def save_png(image: torch.Tensor, path: Path) -> Path:
    """A data set's uint8 (C, H, W) image -> a grey or RGB PNG file at `path`."""
    Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.samples", description=__doc__)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("samples"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    args = p.parse_args(argv)
    try:
        for path in write_samples(args.dataset, args.count, args.out, args.data_dir):
            print(path)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
