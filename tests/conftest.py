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
