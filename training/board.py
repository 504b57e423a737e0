"""Optional TensorBoard logging (`python -m training --tensorboard`), for those who prefer it to the
HTML report: per-epoch scalars while training runs, then the test results and the report's
pictures, in artifacts/<name>/tensorboard/. Watch with `.venv/bin/tensorboard --logdir artifacts`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.errors import UserError

SCALARS = {  # history key -> TensorBoard tag
    "train_loss": "loss/train", "val_loss": "loss/val",
    "train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val",
    "lr": "learning_rate", "images_per_second": "images_per_second",
}
PICTURES = {"confusion_matrix.png": "test/confusion_matrix", "misclassified.png": "test/worst_mistakes"}


class TensorBoard:
    """A SummaryWriter when enabled; every method does nothing when not."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: run `make venv` "
                                "(or pip install -r requirements.txt)") from None
            self.writer = SummaryWriter(str(log_dir))

    def log_epoch(self, entry: dict) -> None:
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            self.writer.add_scalar(tag, entry[key], entry["epoch"])
        self.writer.flush()  # visible in TensorBoard while the next epoch trains

    def finish(self, out_dir: Path) -> None:
        """Test results and the pictures the run wrote, at the last epoch; then closes the log."""
        if self.writer is None:
            return
        metrics = json.loads((out_dir / "metrics.json").read_text())
        step = metrics["epochs"]
        self.writer.add_scalar("test/accuracy", metrics["test_accuracy"], step)
        self.writer.add_scalar("test/loss", metrics["test_loss"], step)
        for file_name, tag in PICTURES.items():
            if (out_dir / file_name).is_file():
                with Image.open(out_dir / file_name) as picture:
                    self.writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        spec = json.loads((out_dir / "spec.json").read_text())
        self.writer.add_text("spec", "```\n" + json.dumps(spec, indent=2) + "\n```", step)
        self.writer.close()
