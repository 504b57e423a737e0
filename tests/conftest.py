"""Session fixtures shared by all test folders (helpers live in helpers.py)."""

from __future__ import annotations

import signal

import pytest
from helpers import FASHION_MNIST, tiny_config


def pytest_configure(config):
    # Tests press Ctrl-C (SIGINT) on the kit's processes. A suite started in the background by a shell
    # without job control (`bash .ci/run &`) inherits SIGINT ignored, and so would every process it
    # starts: a handled SIGINT is reset to the default in each child, as in a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained model shared by tests that only read its outputs."""
    from training.run import train

    artifacts = tmp_path_factory.mktemp("artifacts")
    metrics = train(tiny_config(artifacts))
    return artifacts / "tiny", metrics


@pytest.fixture(scope="session")
def exported_tiny(tiny_run, tmp_path_factory):
    """The tiny model exported: (its artifacts dir with model files, a model store with both archives)."""
    from export.run import ExportConfig, export

    out_dir, _ = tiny_run
    store = tmp_path_factory.mktemp("model_store")
    export(ExportConfig("tiny", out_dir.parent, store))
    return out_dir, store


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(artifacts dir of the model, model store with its two archives) for a 2,000-image run."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed (make test installs it)")
    from export.run import ExportConfig, export
    from training.run import train

    root = tmp_path_factory.mktemp("served")
    config = tiny_config(root / "artifacts", name="fmnist", dataset="fashion-mnist", model="fast-cnn",
                         train_limit=2000, batch_size=64, epochs=1)
    train(config)
    export(ExportConfig("fmnist", root / "artifacts", root / "model_store"))
    return root / "artifacts" / "fmnist", root / "model_store"


@pytest.fixture(scope="session")
def served_images(exported):
    """The first 24 Fashion-MNIST test images, their PNG bytes and the eager model's probabilities."""
    import torch
    from served import png

    from export.checkpoint import load_trained
    from export.data import load_run_data
    from training.loop import normalize, per_channel

    out_dir, _ = exported
    model, spec = load_trained(out_dir)
    test = load_run_data(out_dir)[0].test  # the run's own test split
    images = test.images[:24]
    inputs = normalize(images, per_channel(spec.mean), per_channel(spec.std))
    with torch.no_grad():
        probabilities = torch.softmax(model(inputs).double(), dim=1).numpy()
    return [png(image[0].numpy()) for image in images], probabilities, list(spec.class_names)


@pytest.fixture(scope="session")
def served_inputs(exported):
    """The same 24 test images normalized as training does: float32 (24, C, H, W), what an Open Inference
    Protocol client sends as the FP32 `input`."""
    import json

    from export.data import load_run_data
    from training.loop import normalize, per_channel

    out_dir, _ = exported
    spec = json.loads((out_dir / "spec.json").read_text())
    images = load_run_data(out_dir)[0].test.images[:24]  # the run's own test split, as served_images
    return normalize(images, per_channel(spec["mean"]), per_channel(spec["std"])).numpy()
