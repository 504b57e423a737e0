"""Weights trained with the tutorials' own code, deployed with `--epochs 0`: the tutorials' SimpleCNN
class in the user's file, their transform, their DataLoader loop and `torch.save(model.state_dict(), ...)`,
then `python -m training --epochs 0`, `python -m export` and a real TorchServe. The kit's test accuracy
must be the tutorial loop's own, and the served probabilities the tutorial model's softmax."""

from __future__ import annotations

import gzip
import json
import shutil
import textwrap
from pathlib import Path

import harness
import pytest
import torch
from helpers import FASHION_MNIST, run_cli
from served import assert_matches_eager, png

pytestmark = pytest.mark.integration

# The tutorial's class as written (its conv1 takes in_channels=3 although it trains on MNIST: a reader
# fixes that to 1 for grey images, as here). Its forward ends in x.view(), which needs contiguous tensors.
TUTORIAL_MODEL = '''
import torch
import torch.nn as nn

class SimpleCNN(nn.Module):
    def __init__(self):
        super(SimpleCNN, self).__init__()

        self.conv1 = nn.Conv2d(in_channels=1, out_channels=16, kernel_size=3, stride=1, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(kernel_size=2)

        self.conv2 = nn.Conv2d(in_channels=16, out_channels=32, kernel_size=3, stride=1, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(kernel_size=2)

        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = self.relu1(x)
        x = self.pool1(x)

        x = self.conv2(x)
        x = self.relu2(x)
        x = self.pool2(x)

        x = x.view(-1, 32 * 7 * 7)

        x = self.fc1(x)
        x = self.relu3(x)
        x = self.fc2(x)

        return x
'''
TRAIN_IMAGES = 4000  # a quick epoch; the tutorial trains on all 60,000
SERVED_IMAGES = 16
VARIANTS = {  # the kit's --normalize -> the tutorial's transform, written as the tutorials write it
    "0.5/0.5": lambda transforms: transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]),
    "none": lambda transforms: transforms.ToTensor(),
}


def torchvision_root(tmp_path: Path) -> Path:
    """The Debian package's files where torchvision's FashionMNIST(download=False) reads them (its
    download needs the internet): ROOT/FashionMNIST/raw/, unzipped."""
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for packed in FASHION_MNIST.glob("*-ubyte.gz"):
        with gzip.open(packed) as source, open(raw / packed.stem, "wb") as target:
            shutil.copyfileobj(source, target)
    return tmp_path / "data"


def train_as_the_tutorial_does(model_file: Path, root: Path, transform, weights: Path) -> tuple[torch.nn.Module, float]:
    """The tutorial's training loop for one epoch, its test loop on the official test split, and its
    torch.save: (the trained model, its test accuracy)."""
    import importlib.util

    import torch.nn as nn
    import torch.optim as optim
    import torchvision.datasets as datasets

    spec = importlib.util.spec_from_file_location("tutorial_model", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    torch.manual_seed(0)
    model = module.SimpleCNN()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the tutorial's 0.001 needs its 10 epochs

    train_dataset = datasets.FashionMNIST(root=str(root), train=True, transform=transform, download=False)
    train_dataset = torch.utils.data.Subset(train_dataset, range(TRAIN_IMAGES))
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=64, shuffle=True)
    for _epoch in range(1):
        for _step, (inputs, labels) in enumerate(train_loader):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

    test_dataset = datasets.FashionMNIST(root=str(root), train=False, transform=transform, download=False)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=64, shuffle=False)
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in test_loader:
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    torch.save(model.state_dict(), weights)
    return model, correct / total


def test_tutorial_weights_are_packaged_exported_and_served_unchanged(tmp_path):
    if not FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed (make test installs it)")
    import torchvision.datasets as datasets
    import torchvision.transforms as transforms

    model_file = tmp_path / "user" / "tutorial_cnn.py"
    model_file.parent.mkdir()
    model_file.write_text(textwrap.dedent(TUTORIAL_MODEL))
    root = torchvision_root(tmp_path)
    artifacts, store = tmp_path / "artifacts", tmp_path / "model_store"
    test_dataset = datasets.FashionMNIST(root=str(root), train=False, download=False)
    raw_images = [test_dataset.data[i].numpy() for i in range(SERVED_IMAGES)]

    expected = {}  # served archive -> the tutorial model's probabilities
    for index, (normalize, make_transform) in enumerate(VARIANTS.items()):
        name = f"tutorial-{index}"
        transform = make_transform(transforms)
        weights = tmp_path / f"model-{index}.pth"
        model, tutorial_accuracy = train_as_the_tutorial_does(model_file, root, transform, weights)

        packaged = run_cli("training", "--model", f"{model_file}:SimpleCNN", "--init-from", str(weights),
                           "--epochs", "0", "--normalize", normalize, "--dataset", "fashion-mnist", "--name", name,
                           "--artifacts-dir", str(artifacts), "--workers", "0")
        assert packaged.returncode == 0, packaged.stderr
        metrics = json.loads((artifacts / name / "metrics.json").read_text())
        assert metrics["test_accuracy"] == tutorial_accuracy  # the same 10,000 official test images, same answers
        assert metrics["split_sizes"]["test"] == len(test_dataset) and metrics["epochs"] == 0
        spec = json.loads((artifacts / name / "spec.json").read_text())
        assert spec["normalization"] == ("explicit" if "/" in normalize else normalize)
        saved = torch.load(artifacts / name / "checkpoint.pt", weights_only=True)["state_dict"]
        original = torch.load(weights, weights_only=True)
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)

        exported = run_cli("export", "--name", name, "--artifacts-dir", str(artifacts), "--model-store", str(store),
                           "--workers", "1")
        assert exported.returncode == 0, exported.stderr
        with torch.no_grad():  # the tutorial's own preprocessing of the same images
            inputs = torch.stack([transform(test_dataset[i][0]) for i in range(SERVED_IMAGES)])
            # one archive each (ONNX Runtime, TorchScript): every worker started costs seconds
            expected[name if index == 0 else f"{name}-torchscript"] = torch.softmax(model(inputs).double(), 1).numpy()

    class_names = list(datasets.FashionMNIST.classes)
    server = harness.start(store, tmp_path / "torchserve", list(expected))
    try:
        for name, probabilities in expected.items():
            for image, wanted in zip(raw_images, probabilities):
                status, body, _ = server.predict(name, png(image), "image/png")
                assert status == 200, body
                assert_matches_eager(body, wanted, class_names)
    finally:
        server.stop()
