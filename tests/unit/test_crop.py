"""--resize crop: photos resized by the shorter side and centre-cropped as torchvision and timm do,
recorded in the spec, and served exactly as training evaluated them."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_one_line_error, run_cli, spec_for_tests
from PIL import Image
from served import encode

from handlers.image import KEEP_FACTOR, crop_geometry, open_image, to_pixels
from handlers.pipeline import Classifier, image_pixels, normalized_batch
from handlers.spec import InputShape, Spec
from training import data
from training.loop import batches, centre_crop, normalize, per_channel, random_resized_crop

sys.path.insert(0, str(ROOT / "bench"))
from photo_folder import write_folder  # noqa: E402

LIMIT = 10_000_000


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEG photos of mixed, non-square sizes (500x375, 375x500, ...) in three class folders."""
    return write_folder(tmp_path_factory.mktemp("photos") / "pics", per_class=8)


def crop_classifier(size: int, fraction: float, channels: int = 3) -> Classifier:
    spec = spec_for_tests(("discs", "stripes", "checks"), channels, (size, size), mean=0.45, std=0.27)
    spec = dataclasses.replace(spec, input=dataclasses.replace(spec.input, fit="crop", crop_fraction=fraction))
    return Classifier(spec, LIMIT, lambda batch: batch.reshape(len(batch), -1)[:, :3], "cpu")


@pytest.mark.parametrize("size, fraction", [(224, 0.875), (64, 0.875), (48, 0.9), (56, 1.0), (100, 0.5)])
def test_a_crop_gives_exactly_torchvisions_resize_and_centre_crop(size, fraction):
    """Pixel for pixel, for images under 2 x KEEP_FACTOR times the model's size per side (larger ones are
    box-reduced first, in training and serving alike: test_large_images.py)."""
    import torchvision.transforms as T

    rng = np.random.default_rng(size)
    reference = T.Compose([T.Resize(math.floor(size / fraction)), T.CenterCrop(size)])  # timm's scale_size
    for width, height in [(500, 375), (375, 500), (333, 500), (640, 427), (size, size), (size + 1, size * 3), (20, 17)]:
        if min(width, height) >= 2 * KEEP_FACTOR * size:
            continue
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        expected = np.asarray(reference(image)).transpose(2, 0, 1)
        assert np.array_equal(to_pixels(image, 3, size, size, (0, 0, 0), "crop", fraction), expected), (width, height)


def test_crop_geometry_is_torchvisions_for_square_models_and_covers_for_others():
    assert crop_geometry(500, 375, 224, 224, 0.875) == ((341, 256), (58, 16))  # int(256 * 500 / 375) = 341
    assert crop_geometry(375, 500, 224, 224, 0.875) == ((256, 341), (16, 58))
    (width, height), (left, top) = crop_geometry(500, 375, 160, 240, 0.875)  # a non-square model: covers 182x274
    assert (width, height) == (274, 205) and (left, top) == (17, 22)


def test_a_very_long_strip_is_cropped_without_its_full_resize():
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2, 20_000, 3), dtype=np.uint8), "RGB")
    assert crop_geometry(20_000, 2, 224, 224, 0.875)[0] == (2_560_000, 256)  # 2 GB, were it made
    pixels = to_pixels(strip, 3, 224, 224, (0, 0, 0), "crop", 0.875)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.uint8


@pytest.mark.parametrize("max_memory_mb", [4096, 0])  # held in memory; streamed from disk batch by batch
def test_a_served_photo_gives_exactly_the_tensor_training_evaluated(photos, max_memory_mb):
    loaded = data.load(f"folder:{photos}", None, 0.2, 0.25, 0, image_size=64, max_memory_mb=max_memory_mb,
                       workers=0, resize="crop")
    assert (loaded.fit, loaded.crop_fraction, loaded.shape) == ("crop", 0.875, (3, 64, 64))
    model = crop_classifier(64, 0.875)
    mean, std = per_channel(list(model.spec.mean)), per_channel(list(model.spec.std))
    evaluated = torch.cat([normalize(images, mean, std) for images, _ in
                           batches(loaded.test, 5, torch.device("cpu"), None, loaded.shape, 0)]).numpy()
    sizes = set()
    for index, path in enumerate(loaded.test.files):
        body = path.read_bytes()
        sizes.add(Image.open(path).size)
        served = normalized_batch([image_pixels(body, model)], model)[0]
        assert np.array_equal(served, evaluated[index]), path  # bit for bit, photo by photo
    assert len(sizes) > 1 and all(w != h for w, h in sizes - {(500, 500)})  # mixed, non-square JPEGs


def test_the_training_split_is_held_at_the_resize_scale_and_cut_to_the_model_size(photos):
    loaded = data.load(f"folder:{photos}", None, 0.2, 0.25, 0, image_size=64, workers=0, resize="crop",
                       crop_fraction=0.8)
    assert loaded.train.images.shape[1:] == (3, 80, 80) and loaded.test.images.shape[1:] == (3, 64, 64)
    assert any("shorter side of each image to 80" in note for note in loaded.notes)
    first = open_image(loaded.train.files[0].read_bytes(), LIMIT, (80, 80))
    first = to_pixels(first, 3, 80, 80, (0, 0, 0), "crop", 1.0)
    assert np.array_equal(loaded.train.images[0].numpy(), first)
    images, _ = next(batches(loaded.train, 4, torch.device("cpu"), None, loaded.shape, 0))  # what every reader gets
    assert images.shape[1:] == (3, 64, 64) and torch.equal(images, centre_crop(loaded.train.images[:4], loaded.shape))
    generator = torch.Generator().manual_seed(0)
    cropped = random_resized_crop(loaded.train.images[:6], (64, 64), generator)
    again = random_resized_crop(loaded.train.images[:6], (64, 64), torch.Generator().manual_seed(0))
    assert cropped.shape == (6, 3, 64, 64) and cropped.dtype == torch.uint8 and torch.equal(cropped, again)
    assert not torch.equal(cropped, centre_crop(loaded.train.images[:6], loaded.shape))


def test_stretch_stays_the_default_and_keeps_its_pixels(photos):
    loaded = data.load(f"folder:{photos}", None, 0.2, 0.25, 0, image_size=32, workers=0)
    assert (loaded.fit, loaded.crop_fraction) == ("stretch", None)
    path = loaded.test.files[0]
    assert np.array_equal(loaded.test.images[0].numpy(),
                          to_pixels(open_image(path.read_bytes(), LIMIT, (32, 32)), 3, 32, 32, (0, 0, 0)))


def test_the_png_fast_path_is_not_taken_where_a_crop_changes_the_pixels():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    png = encode(image)
    cropped = image_pixels(png, crop_classifier(32, 0.875))
    assert np.array_equal(cropped, to_pixels(image, 3, 32, 32, (0, 0, 0), "crop", 0.875))
    assert not np.array_equal(cropped, np.asarray(image).transpose(2, 0, 1))
    assert np.array_equal(image_pixels(png, crop_classifier(32, 1.0)), np.asarray(image).transpose(2, 0, 1))


def test_the_spec_records_the_crop_and_older_specs_read_as_stretch():
    spec = crop_classifier(224, 0.875).spec
    record = spec.to_dict()
    assert record["input"]["fit"] == "crop" and record["input"]["crop_fraction"] == 0.875
    assert Spec.from_dict(json.loads(json.dumps(record))) == spec
    older = json.loads(json.dumps(record))
    del older["input"]["fit"], older["input"]["crop_fraction"]
    assert Spec.from_dict(older).input == InputShape(3, 224, 224, "bilinear", (0, 0, 0))
    assert Spec.from_dict(older).input.fit == "stretch"


@pytest.mark.parametrize("input_change", [{"fit": "zoom"}, {"crop_fraction": None}, {"crop_fraction": 1.5},
                                          {"fit": "stretch"}])
def test_a_spec_with_a_broken_fit_is_one_line(input_change):
    record = crop_classifier(224, 0.875).spec.to_dict()
    record["input"].update(input_change)
    with pytest.raises(Exception, match="input fit") as caught:
        Spec.from_dict(record, "spec.json")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("args, fragments", [
    (["--resize", "crop", "--crop-fraction", "0"], ["--crop-fraction 0.0", "(0, 1]"]),
    (["--resize", "crop", "--crop-fraction", "1.5"], ["--crop-fraction 1.5", "(0, 1]"]),
    (["--resize", "crop", "--crop-fraction", "-0.2"], ["(0, 1]"]),
    (["--crop-fraction", "0.9"], ["--crop-fraction applies to --resize crop only"]),
    (["--resize", "zoom"], ["zoom"]),
])
def test_crop_option_mistakes_are_one_line_and_write_nothing(tmp_path, photos, args, fragments):
    result = run_cli("training", "--dataset", f"folder:{photos}", "--artifacts-dir", str(tmp_path / "art"),
                     "--epochs", "1", *args, cwd=tmp_path)
    if args == ["--resize", "zoom"]:  # argparse's own choices check
        assert result.returncode != 0 and "Traceback" not in result.stderr and "zoom" in result.stderr
    else:
        assert_one_line_error(result, *fragments)
    assert not (tmp_path / "art").exists()


def test_resize_crop_on_a_built_in_data_set_is_one_line(tmp_path):
    result = run_cli("training", "--dataset", "mnist-5k", "--resize", "crop", "--artifacts-dir",
                     str(tmp_path / "art"), "--epochs", "1", "--no-download", cwd=tmp_path)
    assert_one_line_error(result, "--resize crop applies to folder: data sets only")
    assert not (tmp_path / "art").exists()


def test_a_crop_run_records_the_crop_and_trains_on_random_resized_crops(tmp_path, photos):
    from helpers import tiny_config

    from training.run import train

    config = tiny_config(tmp_path / "art", name="photos", dataset=f"folder:{photos}", image_size=32,
                         resize="crop", crop_fraction=0.8, augment="crop+flip", test_fraction=0.25, val_fraction=0.2,
                         train_limit=None, batch_size=8)
    metrics = train(config)
    spec = Spec.read(tmp_path / "art" / "photos" / "spec.json")
    assert (spec.input.fit, spec.input.crop_fraction, spec.input.size) == ("crop", 0.8, (3, 32, 32))
    saved = json.loads((tmp_path / "art" / "photos" / "train_config.json").read_text())
    assert (saved["resize"], saved["crop_fraction"]) == ("crop", 0.8)
    assert metrics["split_sizes"]["test"] == 6 and 0 <= metrics["test_accuracy"] <= 1
