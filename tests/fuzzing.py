"""What the fuzzers share: the property every input must satisfy, seed images, and the corpus of
inputs found earlier (tests/fuzz_corpus/, replayed by tests/unit/test_fuzz.py).

The property, for any bytes: the served image steps give a uint8 (C, 28, 28) array and the
normalized float32 tensor of the spec's shape, or a ClientError with a message and a 4xx status;
never another exception. Used by the Hypothesis tests and by `make fuzz` (atheris, tests/fuzz_decode.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import spec_for_tests
from PIL import Image
from served import encode

from handlers.errors import ClientError
from handlers.pipeline import Classifier, image_pixels, normalized_batch

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
SHAPE = (28, 28)


def classifier(channels: int) -> Classifier:
    spec = spec_for_tests(("a", "b"), channels, SHAPE, 0.3, 0.35)
    return Classifier(spec, 4_000_000, lambda batch: np.zeros((len(batch), 2), np.float32), "cpu")


CLASSIFIERS = (classifier(1), classifier(3))


def check(data: bytes) -> None:
    """The property; raises AssertionError (or the unexpected exception) when it does not hold."""
    for model in CLASSIFIERS:
        channels = model.spec.input.channels
        try:
            pixels = image_pixels(data, model)
        except ClientError as error:
            assert str(error) and 400 <= error.status < 500, (error, error.status)
            continue
        assert pixels.dtype == np.uint8 and pixels.shape == (channels, *SHAPE), (pixels.dtype, pixels.shape)
        tensor = normalized_batch([pixels], model)[0]
        assert tensor.dtype == np.float32 and tensor.shape == (channels, *SHAPE) and np.isfinite(tensor).all()


def seeds() -> dict[str, bytes]:
    """Small valid images in every format the endpoint takes, each with a feature worth mutating."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    grey = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("P", (10, 8), 3), Image.new("P", (10, 8), 7)]
    return {
        "png-grey-28": encode(grey, "PNG"),  # the fast path's input
        "png-rgba": encode(rgb.convert("RGBA"), "PNG"),
        "png-palette-transparent": encode(rgb.convert("P"), "PNG", transparency=0),
        "png-16bit": encode(Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)), "PNG"),
        "jpeg-exif": encode(rgb, "JPEG", exif=exif, quality=80),
        "jpeg-progressive": encode(grey, "JPEG", progressive=True),
        "gif-animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp-lossy": encode(rgb, "WEBP", quality=60),
        "webp-lossless-alpha": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "tiff-deflate-exif": encode(rgb, "TIFF", compression="tiff_deflate", exif=exif),
        "bmp": encode(rgb, "BMP"),
    }


def corpus() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(CORPUS.glob("*")) if path.is_file()
            and path.name != "README.md"}
