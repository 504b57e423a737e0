"""A model of your own, written as you would write it: plain PyTorch, nothing from the kit.

Train, export and serve it with the kit:

    make train MODEL=examples/my_net.py:MyNet MODEL_ARGS='{"base_width": 32}' NAME=my-net
    make export NAME=my-net
    make serve        # then: curl -T samples/0-ankle-boot.png http://127.0.0.1:8080/predictions/my-net

The kit fills the constructor's `in_channels` and `num_classes` from the data set (it would fill
`height` and `width` too, had the constructor asked for them); everything else comes from
MODEL_ARGS or the defaults below, and is recorded in the run's spec.
"""

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut around them."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.body(x))


class MyNet(nn.Module):
    """A small residual network: a stem, three stages that halve the resolution and double the
    channels, global average pooling (so any input size works) and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, base_width: int = 32, dropout: float = 0.1):
        super().__init__()
        w = base_width
        self.stem = conv_bn_relu(in_channels, w)
        self.stage1 = ResidualBlock(w)
        self.stage2 = nn.Sequential(conv_bn_relu(w, 2 * w, stride=2), ResidualBlock(2 * w))
        self.stage3 = nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2), ResidualBlock(4 * w))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(self.stem(x)))))


def tiny_my_net(in_channels: int, num_classes: int) -> nn.Module:
    """A function works as well as a class: --model examples/my_net.py:tiny_my_net"""
    return MyNet(in_channels, num_classes, base_width=8, dropout=0.0)
