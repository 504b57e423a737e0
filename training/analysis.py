"""What a finished run got wrong, for the report: the test images the model misclassified with the
highest confidence (its worst mistakes, as fastai's plot_top_losses shows them) and its size.

`write_analysis` runs at the end of training (training/report.py calls it) and writes
analysis.json (parameter counts, the mistakes: test-split index, true and predicted class,
confidence) and misclassified.png (those images in a grid, drawn by training/plots.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.checkpoint import write_json_atomic
from training.data import Data, Split
from training.loop import batches, normalize
from training.plots import plot_misclassified

GRID_SIZE = 24  # mistakes shown: four rows of six


@torch.no_grad()
def worst_mistakes(model: torch.nn.Module, split: Split, predictions: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor, device: torch.device, shape, workers: int,
                   limit: int = GRID_SIZE) -> tuple[list[dict], int]:
    """(the `limit` most confident wrong predictions with their uint8 images, the number of mistakes).

    `predictions` are the test pass's own (what the confusion matrix counts); only the images
    they got wrong are run again, in float32 and eval mode, for the probability of the predicted class.
    """
    model.eval()
    wrong = (predictions.cpu() != split.labels.cpu()).nonzero().flatten()
    # the inputs' layout is left to the model's weights (channels_last or not: training.loop.pick_memory_format)
    probabilities = [torch.softmax(model(normalize(images, mean, std)).float(), dim=1).cpu()
                     for images, _ in batches(split.subset(wrong), 1024, device, None, shape, workers)]
    if not probabilities:
        return [], 0
    predicted = predictions.cpu()[wrong]
    confidence = torch.cat(probabilities).gather(1, predicted[:, None]).flatten()
    order = confidence.sort(descending=True, stable=True).indices[:limit]  # ties: test-split order
    chosen = wrong[order]
    images = torch.cat([images.cpu() for images, _ in batches(split.subset(chosen), limit, device, None, shape,
                                                              workers)])
    labels = split.labels.cpu()
    return [{"index": int(index), "true": int(labels[index]), "predicted": int(predicted[o]),
             "confidence": float(confidence[o]), "image": image.numpy()}
            for index, o, image in zip(chosen, order, images)], len(wrong)


def parameter_counts(model: torch.nn.Module) -> dict:
    parameters = list(model.parameters())
    return {"total": sum(p.numel() for p in parameters),
            "trainable": sum(p.numel() for p in parameters if p.requires_grad)}


def write_analysis(out_dir: Path, model: torch.nn.Module, data: Data, predictions: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor, device: torch.device, workers: int, checkpoint_sha256: str) -> dict:
    """Writes misclassified.png and analysis.json (tied to the checkpoint by its sha256)."""
    kept, mistakes = worst_mistakes(model, data.test, predictions, mean, std, device, data.shape, workers)
    names = data.class_names
    titles = [f"{short(names[m['true']])}\n→ {short(names[m['predicted']])} {m['confidence']:.0%}" for m in kept]
    plot_misclassified([np.asarray(m["image"]) for m in kept], titles, out_dir / "misclassified.png")
    analysis = {
        "checkpoint_sha256": checkpoint_sha256,
        "parameters": parameter_counts(model),
        "test_images": len(data.test),
        "misclassified": mistakes,
        "worst_mistakes": [{"index": m["index"], "true": names[m["true"]], "predicted": names[m["predicted"]],
                            "confidence": round(m["confidence"], 6)} for m in kept],
    }
    write_json_atomic(out_dir / "analysis.json", analysis)
    return analysis


def short(name: str, limit: int = 18) -> str:
    """Class names as grid titles: long ones cut so neighbouring titles do not overlap."""
    return name if len(name) <= limit else name[:limit - 1] + "…"
