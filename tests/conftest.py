"""Session fixtures shared by all test folders (helpers live in helpers.py)."""

from __future__ import annotations

import pytest

from helpers import tiny_config


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
