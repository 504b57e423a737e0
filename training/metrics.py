"""Classification metrics from predictions: confusion matrix, per-class precision / recall / F1."""

from __future__ import annotations

import torch


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class(matrix: torch.Tensor, class_names: list[str]) -> dict[str, dict[str, float]]:
    matrix = matrix.double()
    true_positive = matrix.diag()
    predicted = matrix.sum(0)
    actual = matrix.sum(1)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), 0.0)
    recall = torch.where(actual > 0, true_positive / actual.clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    return {name: {"precision": round(precision[i].item(), 6), "recall": round(recall[i].item(), 6),
                   "f1": round(f1[i].item(), 6), "support": int(actual[i].item())}
            for i, name in enumerate(class_names)}
