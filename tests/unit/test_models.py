"""The model registry: every architecture takes grey and RGB inputs of the data set's size."""

import pytest
import torch

from training.errors import UserError
from training.models import ARCHITECTURES, build


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 20)])
def test_output_shape(arch, channels, size):
    model = build(arch, in_channels=channels, height=size, width=size, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(5, channels, size, size))
    assert logits.shape == (5, 7)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(UserError, match="unknown model 'vgg99'.*mlp.*simple-cnn.*cnn.*resnet18"):
        build("vgg99", in_channels=1, height=28, width=28, num_classes=10)


def test_seed_baselines_keep_their_structure():
    dnn = build("mlp", in_channels=1, height=28, width=28, num_classes=10)
    assert [type(m).__name__ for m in dnn.children()] == ["Linear", "ReLU", "Linear"]
    cnn = build("simple-cnn", in_channels=1, height=28, width=28, num_classes=10)
    assert cnn.fc1.in_features == 32 * 7 * 7 and cnn.conv1.out_channels == 16


def test_resnet18_stem_is_adapted_to_small_inputs():
    model = build("resnet18", in_channels=3, height=32, width=32, num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
