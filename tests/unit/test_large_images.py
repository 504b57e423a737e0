"""Large images cost bounded memory: JPEGs decode at reduced scale, every other format is reduced right
after decoding, WebP has its own share of the pixel limit; the answers stay close to a full-size
decode, and the peak memory of one decode, per format, is measured in a fresh process."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, spec_for_tests
from PIL import Image
from served import encode, photo

from handlers.errors import ClientError
from handlers.image import KEEP_FACTOR, WEBP_SHARE, open_image, reduce_early, to_pixels
from handlers.pipeline import Classifier, image_pixels

LIMIT = 24_000_000


def full_size_pixels(data: bytes, channels: int) -> np.ndarray:
    """What the kit computed before: decode at full size, then composite, convert and resize it."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB").resize((28, 28), Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def classifier(channels: int) -> Classifier:
    spec = spec_for_tests(["a"], channels)
    return Classifier(spec, LIMIT, None, "cpu")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_strip_by_strip_reduction_equals_pillows_whole_image_reduce(mode):
    image = photo(1331, 997, mode)  # sizes that are not multiples of the factor
    factor = min(1331 // (28 * KEEP_FACTOR), 997 // (28 * KEEP_FACTOR))
    assert factor >= 2
    reduced, region = reduce_early(image, 28, 28)
    assert region == (0, 0, 1331 / factor, 997 / factor)
    assert reduced.mode == mode and reduced.size == image.reduce(factor).size
    assert np.array_equal(np.asarray(reduced), np.asarray(image.reduce(factor)))


@pytest.mark.parametrize("fmt, mode, options", [("JPEG", "RGB", {"quality": 90}), ("PNG", "RGB", {}),
                                                ("PNG", "RGBA", {}), ("PNG", "L", {}), ("TIFF", "RGB", {}),
                                                ("WEBP", "RGB", {"lossless": True}), ("BMP", "RGB", {})])
@pytest.mark.parametrize("channels", [1, 3])
def test_large_images_answer_close_to_a_full_size_decode(fmt, mode, options, channels):
    data = encode(photo(2400, 1800, mode), fmt, **options)
    pixels = image_pixels(data, classifier(channels))
    difference = np.abs(pixels.astype(int) - full_size_pixels(data, channels))
    assert pixels.shape == (channels, 28, 28)
    assert difference.mean() <= 0.5 and difference.max() <= 4, (difference.mean(), difference.max())


def test_small_images_take_the_unchanged_path():
    image = photo(200, 150)  # less than 2 x KEEP_FACTOR x the input per side: no draft, no reduction
    for data in (encode(image, "JPEG"), encode(image, "PNG")):
        assert np.array_equal(to_pixels(open_image(data, LIMIT, (28, 28)), 1, 28, 28, (0, 0, 0)),
                              full_size_pixels(data, 1))


def test_tiff_orientation_survives_the_reduction():
    image = photo(1200, 600, "L")
    image.paste(255, (0, 0, 600, 600))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the white half goes on top
    pixels = to_pixels(open_image(encode(image, "TIFF", exif=exif), LIMIT, (28, 28)), 1, 28, 28, (0, 0, 0))
    assert pixels[0, :12].mean() > 240 > pixels[0, 16:].mean()


def test_webp_has_its_own_share_of_the_pixel_limit():
    data = encode(photo(1000, 1000), "WEBP", quality=50)  # 1 megapixel
    assert image_pixels(data, classifier(1)).shape == (1, 28, 28)
    with pytest.raises(ClientError, match="limit for WebP") as caught:
        open_image(data, 1_000_000 * WEBP_SHARE - 1)
    assert caught.value.status == 413
    assert open_image(encode(photo(1000, 1000), "PNG"), 1_000_000 * WEBP_SHARE - 1).size == (1000, 1000)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest process
# would start from the parent's peak.
MEASURE = r"""
import io, json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from handlers.errors import ClientError
from handlers.pipeline import Classifier, image_pixels
from handlers.spec import InputShape, Spec
data = sys.stdin.buffer.read()
spec = Spec("test", "none", {}, {}, ("a",), InputShape(1, 28, 28, "bilinear", (0, 0, 0)), (0.5,), (0.25,), "none")
classifier = Classifier(spec, 24_000_000, None, "cpu")
def peak_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before, started = peak_kb(), time.perf_counter()
try:
    outcome = list(image_pixels(data, classifier).shape)
except ClientError as error:
    outcome = error.status
added = (peak_kb() - before) / 1024
print(json.dumps([added, time.perf_counter() - started, outcome]))
"""


def decode_in_a_fresh_process(data: bytes) -> tuple[float, float, list | int]:
    """(peak resident MB one decode adds, seconds, the pixels' shape or the ClientError's status)."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT)], input=data, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return tuple(json.loads(result.stdout))


def megabytes(bytes_per_pixel: float, pixels: int) -> float:
    return bytes_per_pixel * pixels / 2**20


@pytest.mark.slow
def test_a_23_megapixel_jpeg_decodes_in_a_few_megabytes_and_other_formats_within_4_bytes_per_pixel():
    jpeg = encode(photo(5600, 4200), "JPEG", quality=75)  # 23.5 megapixels, under every limit
    assert len(jpeg) < 1_000_000
    added, _, outcome = decode_in_a_fresh_process(jpeg)
    assert outcome == [1, 28, 28] and added <= 16
    pixels = 3000 * 2000
    for fmt, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("TIFF", "RGB"), ("BMP", "RGB")):
        added, _, outcome = decode_in_a_fresh_process(encode(photo(3000, 2000, mode), fmt))
        assert outcome == [1, 28, 28] and added <= megabytes(4.2, pixels) + 12, (fmt, mode, added)
        if mode == "RGB":  # the measurement sees a full-size decode (Pillow holds RGB in 4 bytes per pixel)
            assert added >= megabytes(3, pixels), (fmt, added)
    added, _, outcome = decode_in_a_fresh_process(encode(photo(2000, 1500), "WEBP", quality=75))  # within its share
    assert outcome == [1, 28, 28] and added <= megabytes(4.2, LIMIT)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P"), ("TIFF", "RGB"),
                                       ("WEBP", "RGB"), ("BMP", "RGB")])
def test_files_claiming_huge_sizes_are_refused_within_bounded_memory_and_time(fmt, mode):
    """The first kilobytes of a huge image (the header claims every pixel) and a header that claims
    more than the limit: a 4xx, the memory a full decode at the limit would take at most, quickly."""
    width, height = (2400, 2400) if fmt == "WEBP" else (5600, 4200)  # WebP: within its share of the limit
    whole = encode(photo(width, height, mode), fmt)
    for claim in (whole[:4096], whole[:len(whole) // 2]):
        added, seconds, outcome = decode_in_a_fresh_process(claim)
        assert outcome in (400, 413) and added <= megabytes(4.2, LIMIT) and seconds < 10, (len(claim), added)
    oversized = encode(Image.new("L", (20_000, 20_000)), "PNG")  # 400 megapixels in a few hundred kilobytes
    added, seconds, outcome = decode_in_a_fresh_process(oversized)
    assert outcome == 413 and added <= 8 and seconds < 2
