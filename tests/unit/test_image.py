"""handlers/image.py: decoding, conversion and normalization, without a server."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FASHION_MNIST
from PIL import Image
from served import encode

from handlers.errors import ClientError
from handlers.image import normalize, open_image, to_pixels

LIMIT = 10_000_000


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_png_of_a_test_image_preprocesses_to_exactly_the_tensor_training_evaluated(tmp_path):
    from training import data
    from training.loop import normalize as training_normalize
    from training.loop import per_channel

    loaded = data.load("fashion-mnist", tmp_path, 0.1, 0.1, 0, download=False)
    mean, std = [0.2860], [0.3530]  # any float32 values work; the spec's are of this size
    expected = training_normalize(loaded.test.images[:50], per_channel(mean), per_channel(std))
    for index in range(50):
        png = encode(Image.fromarray(loaded.test.images[index, 0].numpy(), "L"))
        pixels = to_pixels(open_image(png, LIMIT), 1, 28, 28, (0, 0, 0))
        served = normalize(pixels, np.float32(mean), np.float32(std))
        assert served.dtype == np.float32
        assert np.array_equal(served, expected[index].numpy()), index  # bit for bit


@pytest.mark.parametrize("fmt, mode", [("PNG", "L"), ("PNG", "RGB"), ("JPEG", "RGB"), ("BMP", "RGB"),
                                       ("GIF", "P"), ("WEBP", "RGB"), ("TIFF", "RGB"), ("PNG", "I;16")])
def test_formats_pillow_reads_become_model_input(fmt, mode):
    source = Image.new("RGB", (40, 30), (200, 100, 50)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        source = Image.fromarray(np.full((30, 40), 51400, dtype=np.uint16))  # 51400 / 257 = 200
    pixels = to_pixels(open_image(encode(source, fmt), LIMIT), 3, 28, 28, (0, 0, 0))
    assert pixels.shape == (3, 28, 28) and pixels.dtype == np.uint8
    grey = to_pixels(open_image(encode(source, fmt), LIMIT), 1, 28, 28, (0, 0, 0))
    assert grey.shape == (1, 28, 28)
    if mode == "I;16":
        assert (grey == 200).all()


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("L", (10, 10), 10), Image.new("L", (10, 10), 250)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert to_pixels(open_image(data, LIMIT), 1, 10, 10, (0, 0, 0)).max() < 50


def test_exif_orientation_is_applied():
    image = Image.new("L", (20, 10), 0)
    image.paste(255, (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    pixels = to_pixels(open_image(encode(image, "JPEG", exif=exif, quality=100), LIMIT), 1, 20, 10, (0, 0, 0))
    assert pixels.shape == (1, 20, 10)
    assert pixels[0, :8].mean() > 200 and pixels[0, 12:].mean() < 50  # the white half is now on top


def test_transparency_is_composited_onto_the_spec_background():
    transparent = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert (to_pixels(open_image(encode(transparent), LIMIT), 1, 4, 4, (0, 0, 0)) == 0).all()
    assert (to_pixels(open_image(encode(transparent), LIMIT), 3, 4, 4, (10, 20, 30))[:, 0, 0] == [10, 20, 30]).all()


@pytest.mark.parametrize("payload, status, message", [
    (b"", 400, "empty"),
    (b"hello, this is text", 400, "not an image"),
    (encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:-30], 400, "truncated or corrupt"),
])
def test_bad_bytes_are_bad_images(payload, status, message):
    with pytest.raises(ClientError, match=message) as caught:
        open_image(payload, LIMIT)
    assert caught.value.status == status


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("L", (20_000, 20_000), 0))  # 400 megapixels in a few hundred kilobytes
    assert len(bomb) < 1_000_000
    with pytest.raises(ClientError, match="exceeds the limit") as caught:
        open_image(bomb, LIMIT)
    assert caught.value.status == 413
