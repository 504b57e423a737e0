"""A real TorchServe serving the session's tiny Fashion-MNIST archives (see tests/conftest.py)."""

from __future__ import annotations

import harness
import pytest


@pytest.fixture(scope="session")
def server(exported, tmp_path_factory):
    _, model_store = exported
    process = harness.start(model_store, tmp_path_factory.mktemp("torchserve"), ["fmnist", "fmnist-torchscript"])
    yield process
    process.stop()
