"""A `folder:` data set of photo-like JPEGs, generated deterministically (no download, no package data).

Three classes that differ by what a classifier sees in photos (shape and texture, not size): `discs`
(a few soft-edged blobs), `stripes` (oriented waves) and `checks` (a tilted checkerboard), each on a
smooth colour gradient with sensor-like noise, in the sizes cameras and web photos come in, mostly
around 500x375 (landscape and portrait). Every image is a JPEG (quality 90), so loading and serving
decode it exactly as they would a camera's file. The same seed gives the same bytes.

Run: python bench/photo_folder.py OUT_DIR [--per-class 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("discs", "stripes", "checks")
SIZES = ((500, 375), (375, 500), (500, 333), (480, 360), (512, 384), (640, 427), (400, 300), (500, 500))


def photo(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture of class `kind`: the class's pattern over a random gradient, plus noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    base = rng.uniform(40, 215, 3)
    tilt = rng.uniform(-80, 80, (2, 3))
    picture = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    if kind == "discs":
        pattern = np.zeros_like(x)
        for _ in range(rng.integers(2, 5)):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.22)
            pattern += 1 / (1 + np.exp((np.hypot((x - cx) * width / height, y - cy) - r) * 60))
    else:
        angle, frequency = rng.uniform(0, np.pi), rng.uniform(6, 14)
        u = x * np.cos(angle) + y * np.sin(angle) * height / width
        v = -x * np.sin(angle) + y * np.cos(angle) * height / width
        pattern = (np.sin(2 * np.pi * frequency * u) + 1) / 2 if kind == "stripes" else \
            (np.sign(np.sin(2 * np.pi * frequency * u) * np.sin(2 * np.pi * frequency * v)) + 1) / 2
    colour = rng.uniform(-90, 90, 3)
    picture = picture + pattern[..., None] * colour + rng.normal(0, 6, picture.shape)
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_folder(root: Path, per_class: int = 100, seed: int = 0) -> Path:
    """root/<class>/<n>.jpg for every class; returns root. Sizes cycle through SIZES per class."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            width, height = SIZES[index % len(SIZES)]
            (root / kind / f"{index:04d}.jpg").write_bytes(jpeg(photo(kind, width, height, rng)))
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--per-class", type=int, default=100, help="images per class (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    args = p.parse_args()
    write_folder(args.out_dir, args.per_class, args.seed)
    print(f"wrote {args.per_class * len(CLASSES)} JPEGs in {len(CLASSES)} classes to {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
