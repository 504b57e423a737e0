"""Shared test helpers: tiny real training runs, CLI calls, error assertions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_config(artifacts_dir: Path, **overrides):
    """A real training run small enough for a unit test: 600 MNIST digits, one epoch."""
    from training.config import TrainConfig

    options = dict(name="tiny", dataset="mnist-5k", model="simple-cnn", epochs=1, batch_size=32, lr=0.05,
                   train_limit=600, artifacts_dir=artifacts_dir, workers=0, download=False)
    options.update(overrides)
    return TrainConfig(**options)


def spec_for_tests(class_names, channels: int = 1, size: tuple[int, int] = (28, 28), mean: float = 0.5,
                   std: float = 0.25):
    """A Spec for pipeline tests that need no trained model: only classes, input and normalization matter."""
    from handlers.spec import InputShape, Spec

    return Spec("test", "none", {}, {}, tuple(class_names), InputShape(channels, *size, "bilinear", (0,) * 3),
                (mean,) * channels, (std,) * channels, "none")


def minor_versions_behind(serving: str, training: str) -> int:
    """How many minor versions `serving` is behind `training` (same major version, local tags ignored)."""
    (serving_major, serving_minor), (training_major, training_minor) = (
        tuple(int(part) for part in version.split("+")[0].split(".")[:2]) for version in (serving, training))
    assert serving_major == training_major, (serving, training)
    return training_minor - serving_minor


def run_cli(module: str, *args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: non-zero exit, one 'error:' line naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
