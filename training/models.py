"""The model registry: the architectures the kit ships, by name.

Users' own models come from their files instead (training/model_origin.py resolves both).
"""

from __future__ import annotations

import torch
from torch import nn

from training.errors import UserError


class SimpleDNN(nn.Module):
    """The seeds' SimpleDNN: Linear-ReLU-Linear on flattened pixels (a baseline)."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * height * width, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class SimpleCNN(nn.Module):
    """The seeds' SimpleCNN: two conv+ReLU+max-pool blocks, two fully connected layers (a baseline)."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * (height // 4) * (width // 4), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SmallImageCNN(nn.Module):
    """The earlier default (`cnn`): a compact VGG-style CNN for small images (batch norm, dropout).

    Three stages of 3x3 conv + batch norm + ReLU, halving the resolution between stages, then
    dropout and a linear classifier over the flattened last feature map (small images keep
    useful position information; global pooling would throw it away).
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 widths: tuple[int, int, int] = (16, 64, 128), dropout: float = 0.25):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            *conv_bn(in_channels, a), nn.MaxPool2d(2),
            *conv_bn(a, b), nn.MaxPool2d(2),
            *conv_bn(b, c), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * (height // 8) * (width // 8), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FastCNN(nn.Module):
    """The default: a VGG-style CNN laid out for accuracy per second of training on small images.

    Four 3x3 convolutions (widths 16, 64, 128, 256), each followed by batch norm and ReLU; the
    first three halve the resolution with a 2x2 max-pool placed right after the convolution, as
    Keller Jordan's airbench does, so batch norm and ReLU run on a quarter of the pixels. The
    last runs at 1/8 of the input size, where a wide layer is cheap. A linear classifier reads the
    flattened last feature map (small images keep useful position information). No dropout: on
    Fashion-MNIST it cost accuracy (92.30 % against 92.77 % in 8 epochs; docs/design-notes.md, "The default model").
    """

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 widths: tuple[int, int, int, int] = (16, 64, 128, 256)):
        super().__init__()
        a, b, c, d = widths
        self.features = nn.Sequential(
            *conv_pool_bn(in_channels, a), *conv_pool_bn(a, b), *conv_pool_bn(b, c), *conv_bn(c, d))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(d * (height // 8) * (width // 8), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv_pool_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def resnet18(in_channels: int, height: int, width: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a stem for small inputs: a 3x3 stride-1 conv, no max-pool."""
    import torchvision  # imported where needed: it adds seconds to every start

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


ARCHITECTURES = {
    "mlp": SimpleDNN,
    "simple-cnn": SimpleCNN,
    "cnn": SmallImageCNN,
    "resnet18": resnet18,
    "fast-cnn": FastCNN,
}
DEFAULT_ARCH = "fast-cnn"


def architecture(arch: str):
    """The registry's constructor for `arch`; an unknown name is a UserError listing the choices."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown model {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def check_input_size(arch: str, height: int, width: int) -> None:
    if arch in ("simple-cnn", "cnn", "fast-cnn") and min(height, width) < 8:
        raise UserError(f"model {arch} needs images of at least 8x8 pixels, not {width}x{height}")


def build(arch: str, **arch_args) -> nn.Module:
    """A fresh model of the named architecture (arguments as stored in the spec)."""
    check_input_size(arch, arch_args["height"], arch_args["width"])
    return architecture(arch)(**arch_args)
