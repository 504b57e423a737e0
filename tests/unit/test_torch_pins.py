"""The torch pin policy (docs/deploy.md): the serving image's torch is at most one minor version older than
training's, which writes the TorchScript archives the image loads. The Docker end-to-end test checks the
running image against an archive (tests/e2e/test_docker.py)."""

from __future__ import annotations

import re

from helpers import ROOT, minor_versions_behind


def pinned(requirements: str, package: str) -> str:
    match = re.search(rf"^{package}==([^\s#]+)", (ROOT / requirements).read_text(), re.MULTILINE)
    assert match, f"{requirements} pins no {package}"
    return match.group(1)


def test_the_serving_torch_is_at_most_one_minor_version_older_than_the_training_torch():
    serving, training = pinned("docker/requirements-serve.txt", "torch"), pinned("requirements.txt", "torch")
    assert minor_versions_behind(serving, training) in (0, 1)


def test_versions_compare_by_minor_version():
    assert minor_versions_behind("2.13.0+cpu", "2.14.1") == 1
    assert minor_versions_behind("2.14.1", "2.14.1") == 0
    assert minor_versions_behind("2.12.0", "2.14.1") == 2
