"""The serving fast paths give exactly what the general paths give: the PNG decoder for images already
at the model's size and mode, batch normalization, and the JSON text of the answers."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import numpy as np
import pytest
from helpers import FASHION_MNIST, spec_for_tests
from PIL import Image, PngImagePlugin
from served import encode

from handlers.contract import predictions_json
from handlers.errors import ClientError
from handlers.image import normalize, open_image, png_pixels_at_size, to_pixels
from handlers.pipeline import (
    Classifier,
    image_pixels,
    normalized_batch,
    probabilities_of_pixels,
    results,
    results_json,
)

LIMIT = 10_000_000


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def split_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position < len(png):
        length, kind = struct.unpack_from(">I4s", png, position)
        chunks.append((kind, png[position + 8:position + 8 + length]))
        position += 12 + length
    return chunks


def join_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, payload) for kind, payload in chunks)


def general(data: bytes, channels: int, size=(28, 28)) -> np.ndarray:
    return to_pixels(open_image(data, LIMIT), channels, size[1], size[0], (0, 0, 0))


def spec_of(channels: int, class_names=("a", "b", "c")):
    return spec_for_tests(class_names, channels, mean=0.3, std=0.35)


def classifier(channels: int = 1, infer=None) -> Classifier:
    infer = infer or (lambda batch: batch.reshape(len(batch), -1)[:, :3].astype(np.float32))
    return Classifier(spec_of(channels), LIMIT, infer, "cpu")


def served_tensor(image: bytes, model: Classifier) -> np.ndarray:
    """float32 (C, H, W): what the served model is given for one image."""
    return normalized_batch([image_pixels(image, model)], model)[0]


def noise(mode: str, size=(28, 28), seed: int = 0) -> Image.Image:
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fast_path_gives_the_general_paths_pixels_for_real_test_images(tmp_path):
    from training import data
    from training.loop import normalize as training_normalize
    from training.loop import per_channel

    test = data.load("fashion-mnist", tmp_path, 0.1, 0.1, 0, download=False).test.images[:300]
    model = classifier()
    evaluated = training_normalize(test, per_channel(list(model.spec.mean)), per_channel(list(model.spec.std))).numpy()
    for index, image in enumerate(test[:, 0].numpy()):
        png = encode(Image.fromarray(image, "L"))
        fast = png_pixels_at_size(png, 1, 28, 28)
        assert fast is not None, index  # the plain PNG a client sends takes the fast path
        assert fast.dtype == np.uint8 and np.array_equal(fast, general(png, 1)), index
        assert np.array_equal(served_tensor(png, model), evaluated[index]), index  # the tensor training evaluated


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_fast_path_is_exact_for_every_png_filter_and_compression(mode, channels):
    for seed in range(20):
        image = noise(mode, seed=seed)
        if seed % 2:  # smooth images make the encoder choose Sub/Up/Average/Paeth filters too
            image = image.resize((7, 7)).resize((28, 28), Image.Resampling.BILINEAR)
        for level in (0, 1, 9):
            png = encode(image, compress_level=level)
            fast = png_pixels_at_size(png, channels, 28, 28)
            assert fast is not None and np.array_equal(fast, general(png, channels)), (seed, level)


def test_fast_path_takes_inert_chunks_and_split_image_data():
    png = encode(noise("L"))
    chunks = split_chunks(png)
    header, data, end = chunks[0], b"".join(p for k, p in chunks if k == b"IDAT"), chunks[-1]
    inert = [(b"gAMA", struct.pack(">I", 45455)), (b"sRGB", b"\x00"), (b"pHYs", struct.pack(">IIB", 2835, 2835, 1))]
    split = [(b"IDAT", data[i:i + 300]) for i in range(0, len(data), 300)]  # three IDAT chunks
    variant = join_chunks([header, *inert, *split, end])
    assert np.array_equal(png_pixels_at_size(variant, 1, 28, 28), general(png, 1))
    assert np.array_equal(general(variant, 1), general(png, 1))


def with_chunk_before_data(png: bytes, kind: bytes, payload: bytes) -> bytes:
    chunks = split_chunks(png)
    return join_chunks([chunks[0], (kind, payload), *chunks[1:]])


def oriented_png() -> bytes:
    """A 28x28 grey PNG whose EXIF says "rotate 90 degrees": the general path must rotate it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    image = Image.new("L", (28, 28), 0)
    image.paste(255, (0, 0, 14, 28))
    return encode(image, exif=exif)


def text_png() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    return encode(noise("L"), pnginfo=info)


DECLINED = {  # PNGs the fast path leaves to the general one, each for its own reason
    "another size": lambda: encode(noise("L", (27, 28))),
    "RGB for a grey model": lambda: encode(noise("RGB")),
    "palette": lambda: encode(noise("L").convert("P")),
    "grey with alpha": lambda: encode(noise("L").convert("LA")),
    "transparent colour (tRNS)": lambda: encode(noise("L"), transparency=0),
    "16-bit": lambda: encode(Image.fromarray(np.full((28, 28), 51400, dtype=np.uint16))),
    "EXIF orientation": oriented_png,
    "text chunk": text_png,
    "chunk after the image data": lambda: (lambda c: join_chunks([*c[:-1], (b"tEXt", b"k\x00v"), c[-1]]))(
        split_chunks(encode(noise("L")))),
    "unknown chunk": lambda: with_chunk_before_data(encode(noise("L")), b"zzZz", b"?"),
    "bad CRC": lambda: (lambda p: p[:-20] + bytes([p[-20] ^ 1]) + p[-19:])(encode(noise("L"))),
    "truncated": lambda: encode(noise("L"))[:-30],
    "no IEND": lambda: encode(noise("L"))[:-12],
    "not a PNG": lambda: encode(noise("L"), "BMP"),
}


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_fast_path_declines_what_it_does_not_handle_and_the_pipeline_answers_as_before(case):
    data = DECLINED[case]()
    assert png_pixels_at_size(data, 1, 28, 28) is None
    try:
        expected = general(data, 1)
    except ClientError as error:
        with pytest.raises(ClientError) as caught:
            image_pixels(data, classifier())
        assert (str(caught.value), caught.value.status) == (str(error), error.status)
    else:
        assert np.array_equal(image_pixels(data, classifier()), expected)


def test_interlaced_png_takes_the_general_path():
    header = split_chunks(encode(noise("L")))[0]
    interlaced = header[1][:12] + b"\x01"
    assert png_pixels_at_size(join_chunks([(b"IHDR", interlaced), (b"IEND", b"")]), 1, 28, 28) is None


def test_exif_orientation_is_still_applied_at_the_models_size():
    pixels = image_pixels(oriented_png(), classifier())
    assert pixels[0, :12].mean() > 200 and pixels[0, 16:].mean() < 50  # the white left half is now on top


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_a_batch_is_normalized_exactly_as_one_image_at_a_time(mode, channels):
    pngs = [encode(noise(mode, seed=seed)) for seed in range(9)]
    every_value = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)  # in every channel
    pngs.append(encode(Image.fromarray(every_value if channels == 1 else np.dstack([every_value] * 3))))
    seen = []
    model = classifier(channels, infer=lambda batch: seen.append(batch.copy()) or np.zeros((len(batch), 3)))
    model = dataclasses.replace(model, spec=dataclasses.replace(model.spec, mean=(0.1, 0.5, 0.9)[:channels],
                                                                std=(0.3, 0.25, 0.2)[:channels]))
    predictions_json([{"body": png} for png in pngs], model)
    singles = np.stack([served_tensor(png, model) for png in pngs])
    assert seen[0].dtype == np.float32 and seen[0].shape == (10, channels, 28, 28)
    assert np.array_equal(seen[0], singles)
    expected = normalize(np.stack([general(p, channels) for p in pngs]), np.float32(model.spec.mean),
                         np.float32(model.spec.std))
    assert np.array_equal(singles, expected) and np.array_equal(seen[0], expected)


@pytest.mark.parametrize("class_names", [("T-shirt/top", "Trouser", "Bag"),
                                         ('say "hi"', "100% \\ cotton", "Ünïcode ✓")])
def test_answers_as_json_text_are_exactly_what_json_dumps_writes(class_names):
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=50)
    probabilities[0] = [1.0, 0.0, 0.0]
    probabilities[1] = [1e-300, 0.5, 0.5]  # a tie: the first maximum, as argmax gives it
    texts = results_json(probabilities, list(class_names))
    assert texts == [json.dumps(answer) for answer in results(probabilities, list(class_names))]
    assert json.loads(texts[1])["index"] == 1


def test_json_text_of_a_broken_models_nan_is_json_dumps_own():
    probabilities = np.array([[np.nan, 0.5, 0.5]])
    assert results_json(probabilities, ["a", "b", "c"]) == [json.dumps(results(probabilities, ["a", "b", "c"])[0])]


def test_predictions_json_are_the_results_of_the_good_images_as_text():
    rows = [{"body": encode(noise("L", seed=1))}, {"body": b"junk"}, {"body": encode(noise("RGB", (40, 30)))}]
    model = classifier()
    as_text = predictions_json(rows, model)
    as_dicts = results(probabilities_of_pixels([image_pixels(rows[i]["body"], model) for i in (0, 2)], model),
                       list(model.spec.class_names))
    with pytest.raises(ClientError) as refused:
        image_pixels(rows[1]["body"], model)
    assert isinstance(as_text[1], ClientError) and str(as_text[1]) == str(refused.value)
    assert [json.loads(as_text[i]) for i in (0, 2)] == as_dicts
