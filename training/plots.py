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


def plot_misclassified(images, titles: list[str], path: Path, columns: int = 6) -> None:
    """A grid of uint8 (C, H, W) images, each titled (e.g. true class -> predicted, confidence)."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, title in zip(axes.flat, images, titles):
        if image.shape[0] == 1:
            axis.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            axis.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        axis.set_title(title, fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    figure.tight_layout()
    save_png(figure, path)
