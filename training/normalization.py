"""--normalize: how a model's inputs are normalized, as the spec's per-channel mean and std.

  data       the mean/std of the training split's pixels scaled to [0, 1] (computed by the run)
  none       pixels / 255 (mean 0, std 1): what torchvision's ToTensor() alone gives
  imagenet   torchvision's and timm's ImageNet mean/std (RGB images only)
  MEAN/STD   one value per channel, e.g. 0.5/0.5 (ToTensor + Normalize((0.5,), (0.5,))) or
             0.485,0.456,0.406/0.229,0.224,0.225

The text is checked when a config is built (`parse`); the channel count once the data set is
known (`resolve`). Every form becomes the same (x / 255 - mean) / std in training, export and serving.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from training.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NAMED = ("data", "none", "imagenet")
FORMS = "data, none, imagenet or MEAN/STD with one value per channel (e.g. 0.5/0.5)"


def parse(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """An explicit MEAN/STD as two tuples; None for a named choice. Unreadable text is a UserError."""
    if text in NAMED:
        return None
    halves = text.split("/")
    if len(halves) != 2:
        raise UserError(f"--normalize {text!r}: give {FORMS}")
    try:
        mean, std = (tuple(float(value) for value in half.split(",")) for half in halves)
    except ValueError:
        raise UserError(f"--normalize {text!r}: MEAN and STD must be numbers separated by commas "
                        "(e.g. 0.485,0.456,0.406/0.229,0.224,0.225)") from None
    if len(mean) != len(std):
        raise UserError(f"--normalize {text!r}: {len(mean)} mean value(s) but {len(std)} std value(s): "
                        "give one of each per channel")
    if not all(math.isfinite(value) for value in mean + std):
        raise UserError(f"--normalize {text!r}: every value must be a finite number")
    if min(std) <= 0:
        raise UserError(f"--normalize {text!r}: every std must be positive (inputs are divided by it)")
    return mean, std


def kind(text: str) -> str:
    """What the spec records as its `normalization`: data, none, imagenet or explicit."""
    return text if text in NAMED else "explicit"


def resolve(text: str, channels: int, data_stats: Callable[[], tuple[list[float], list[float]]],
            dataset: str) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std) for `channels`-channel images; `data_stats` computes the training split's."""
    if text == "data":
        return data_stats()
    if text == "none":
        return [0.0] * channels, [1.0] * channels
    if text == "imagenet":
        if channels != 3:
            raise UserError(f"--normalize imagenet is the mean/std of RGB images; {dataset} has {channels} channel(s): "
                            f"give MEAN/STD with {channels} value(s) each, or data or none")
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    mean, std = parse(text)
    if len(mean) != channels:
        raise UserError(f"--normalize {text}: {len(mean)} value(s) per half, but {dataset} has {channels} "
                        f"channel(s): give one mean and one std per channel")
    return list(mean), list(std)
