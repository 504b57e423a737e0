"""A tiny Fashion-MNIST model, trained, exported and served by a real TorchServe for the session."""

from __future__ import annotations

import pytest

import harness
from helpers import FASHION_MNIST, tiny_config


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(artifacts dir of the model, model store with its two archives) for a 2,000-image run."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed (make test installs it)")
    from export.run import ExportConfig, export
    from training.run import train

    root = tmp_path_factory.mktemp("served")
    config = tiny_config(root / "artifacts", name="fmnist", dataset="fashion-mnist", model="cnn",
                         train_limit=2000, batch_size=64, epochs=1)
    train(config)
    export(ExportConfig("fmnist", root / "artifacts", root / "model_store"))
    return root / "artifacts" / "fmnist", root / "model_store"


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    _, model_store = exported
    process = harness.start(model_store, tmp_path_factory.mktemp("torchserve"), ["fmnist", "fmnist-torchscript"])
    yield process
    process.stop()
