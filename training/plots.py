"""PNG plots written with every run: learning curves and the test-set confusion matrix."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from training.checkpoint import write_bytes_atomic  # noqa: E402


def save_png(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        accuracy_axis.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    loss_axis.set(title="loss", xlabel="epoch")
    accuracy_axis.set(title="accuracy", xlabel="epoch")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    save_png(figure, path)


def plot_confusion(matrix, class_names: list[str], path: Path, title: str) -> None:
    size = max(5.0, 0.6 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(matrix, cmap="Blues")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    threshold = matrix.max() / 2
    if len(class_names) <= 20:  # counts stay legible up to about 20 classes
        for i in ticks:
            for j in ticks:
                value = int(matrix[i][j])
                axis.text(j, i, value, ha="center", va="center", fontsize=8,
                          color="white" if value > threshold else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    save_png(figure, path)
