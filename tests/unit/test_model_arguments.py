"""Which constructor arguments the kit fills from the data set (training/model_origin.py): channels and
classes always, the image size only by names that cannot mean anything else; a lone `width` or `height`
is the model's own parameter."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, run_cli

from training.errors import UserError
from training.model_origin import arguments, data_argument_names, resolve

SHAPE, CLASSES = (1, 28, 28), 10  # mnist-5k

RESIDUAL = '''import torch
from torch import nn


class ResidualNet(nn.Module):
    """A residual net whose `width` is its channel width (wide ResNets, timm), not the image's."""

    def __init__(self, in_channels, num_classes, width=16, depth=2):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                                                  nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean(dim=(2, 3)))
'''


def origin_of(tmp_path, signature: str, name: str = "Net"):
    """A model file whose constructor has `signature`; the model itself is a linear layer."""
    path = tmp_path / f"{name.lower()}.py"
    path.write_text(f"from torch import nn\n\n\ndef {name}({signature}, **ignored):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(2))\n")
    return resolve(f"{path}:{name}")


def test_a_lone_width_is_the_models_own_parameter(tmp_path):
    path = tmp_path / "residual.py"
    path.write_text(RESIDUAL)
    origin = resolve(f"{path}:ResidualNet")
    assert arguments(origin, SHAPE, CLASSES, {}) == {"in_channels": 1, "num_classes": 10, "width": 16, "depth": 2}
    assert arguments(origin, SHAPE, CLASSES, {"width": 24})["width"] == 24
    assert data_argument_names(origin) == {"in_channels", "num_classes"}


@pytest.mark.parametrize("signature, filled", [
    ("in_channels, num_classes, height, width", {"in_channels": 1, "num_classes": 10, "height": 28, "width": 28}),
    ("in_chans, num_classes", {"in_chans": 1, "num_classes": 10}),  # timm's spelling
    ("num_classes, image_size", {"num_classes": 10, "image_size": 28}),
    ("num_classes, img_size", {"num_classes": 10, "img_size": 28}),
    ("num_classes, input_size", {"num_classes": 10, "input_size": 28}),
    ("num_classes, height=5", {"num_classes": 10, "height": 5}),  # a lone height is the model's own too
])
def test_what_is_unambiguous_is_filled_in(tmp_path, signature, filled):
    assert arguments(origin_of(tmp_path, signature), SHAPE, CLASSES, {}) == filled


def test_an_image_size_that_is_not_square_is_height_then_width(tmp_path):
    assert arguments(origin_of(tmp_path, "num_classes, img_size"), (3, 32, 48), 4, {}) == {"num_classes": 4,
                                                                                         "img_size": [32, 48]}


@pytest.mark.parametrize("signature, given, message", [
    ("in_channels, num_classes", {"num_classes": 5}, "num_classes=5 conflicts with the data set (num_classes is 10)"),
    ("in_chans, num_classes", {"in_chans": 3}, "in_chans=3 conflicts with the data set (in_chans is 1)"),
    ("num_classes, height, width", {"width": 24}, "width=24 conflicts with the data set (width is 28)"),
    ("num_classes, img_size", {"img_size": 32}, "img_size=32 conflicts with the data set (img_size is 28)"),
])
def test_a_conflict_on_an_unambiguous_name_is_an_error(tmp_path, signature, given, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        arguments(origin_of(tmp_path, signature), SHAPE, CLASSES, given)


def test_the_residual_net_trains_with_its_own_width(tmp_path):
    """The issue's case end to end: `--model-args '{"width": 24}'` trains a net 24 channels wide."""
    path = tmp_path / "residual.py"
    path.write_text(RESIDUAL)
    artifacts = tmp_path / "artifacts"
    result = run_cli("training", "--dataset", "mnist-5k", "--model", f"{path}:ResidualNet", "--model-args",
                     '{"width": 24}', "--epochs", "1", "--train-limit", "256", "--name", "wide",
                     "--artifacts-dir", str(artifacts), "--workers", "0")
    assert result.returncode == 0, result.stderr
    spec = json.loads((artifacts / "wide" / "spec.json").read_text())
    assert spec["arch_args"] == {"in_channels": 1, "num_classes": 10, "width": 24, "depth": 2}
    conflicting = run_cli("training", "--dataset", "mnist-5k", "--model", f"{path}:ResidualNet", "--model-args",
                          '{"num_classes": 3}', "--epochs", "1", "--name", "bad", "--artifacts-dir", str(artifacts))
    assert_one_line_error(conflicting, "conflicts with the data set (num_classes is 10)")
    assert not (artifacts / "bad").exists()
