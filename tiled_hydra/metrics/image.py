"""Image metrics: AUROC of image scores and F1 of image labels (torchmetrics)."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc, binary_f1_score


def to_unit_interval(values: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] in float64: torchmetrics applies a sigmoid to values outside
    [0, 1], which saturates large raw scores (e.g. Mahalanobis distances) into ties."""
    values = values.detach().double().reshape(-1)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def image_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    labels = labels.reshape(-1).long()
    if labels.min() == labels.max():
        return math.nan  # AUROC needs both classes
    return float(binary_auroc(to_unit_interval(scores), labels))


def f1(predicted: torch.Tensor, target: torch.Tensor) -> float:
    # bool, not long: 8x less memory on ~26M pixels; binary by construction, so no value scan
    return float(binary_f1_score(predicted.reshape(-1).bool(), target.reshape(-1).bool(), validate_args=False))


def image_metrics(image_scores: torch.Tensor, image_labels: torch.Tensor, pred_image_labels: torch.Tensor) -> dict[str, float]:
    """``image_AUROC`` (NaN with one class only) and ``image_F1`` of one test set."""
    return {"image_AUROC": image_auroc(image_scores, image_labels), "image_F1": f1(pred_image_labels, image_labels)}
