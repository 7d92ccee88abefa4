"""Normalisation and thresholds, fitted on validation data, never on the images they score.

A :class:`Postprocessor` holds what is fitted: the min/max of image scores and of map
values (for min-max normalisation) and the F1-optimal thresholds for image scores and
for pixels. Normalisation follows anomalib: ``(x - threshold) / (max - min) + 0.5``,
clipped to [0, 1], so the threshold maps to 0.5. Predictions compare the raw values
with the thresholds (``x >= threshold``), never the rounded normalised ones.

Datasets without a validation split (e.g. MVTec AD) are handled by :func:`cross_fit`:
the test set is split into 2 folds, stratified by image label and seeded, and each fold
is thresholded and normalised with parameters fitted on the other fold only. So no
image's own score, map, label or mask enters the parameters applied to it. (The fold
split itself balances the labels, so which images land in the other fold depends on
the label counts; pass ``folds`` to hold the split fixed.)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tiled_hydra.errors import DataError

#: Written by a run next to results.json; read by ``python -m tiled_hydra.predict``.
POSTPROCESS_FILE = "postprocess.json"


def f1_optimal_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The distinct score t maximising F1 of ``scores >= t`` (the highest such t on ties in F1).

    Without positives F1 is 0 everywhere: the threshold is then just above the highest
    score, so no fitted sample is flagged. One value sort (no argsort: 2x faster on the
    millions of pixels of a pixel threshold); true positives per threshold come from
    the positives' own sorted values.
    """
    labels = labels.reshape(-1).bool()
    num_positive = int(labels.sum())
    if num_positive == 0:
        highest = scores.detach().max().cpu()
        return float(torch.nextafter(highest, torch.tensor(float("inf"), dtype=highest.dtype)))
    values = scores.detach().reshape(-1).cpu().numpy()
    ascending = np.sort(values)
    # sort puts NaN last and -inf/+inf at the ends: checking both ends checks every value
    if not (np.isfinite(ascending[0]) and np.isfinite(ascending[-1])):
        raise ValueError("scores or maps contain NaN or infinite values")
    run_starts = np.flatnonzero(np.concatenate(([True], ascending[1:] != ascending[:-1])))
    thresholds = ascending[run_starts]  # the distinct values, ascending
    predicted = values.size - run_starts  # samples >= each threshold
    positives = np.sort(values[labels.cpu().numpy()])
    true_pos = num_positive - np.searchsorted(positives, thresholds, side="left")
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted positives + actual positives)
    f1 = (2 * true_pos).astype(np.float32) / (predicted + num_positive).astype(np.float32)
    return float(thresholds[np.flatnonzero(f1 == f1.max())[-1]])  # last = highest threshold


def _normalize(values: torch.Tensor, threshold: float, low: float, high: float) -> torch.Tensor:
    span = high - low if high > low else 1.0  # constant fitted values: avoid dividing by 0
    return torch.sub(values, threshold).div_(span).add_(0.5).clamp_(0.0, 1.0)  # one new tensor, in place after


@dataclass(frozen=True)
class Postprocessor:
    image_threshold: float
    pixel_threshold: float
    score_min: float
    score_max: float
    map_min: float | None = None  # None when fitted without maps
    map_max: float | None = None

    def normalize_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Image scores -> [0, 1], the image threshold at 0.5."""
        return _normalize(scores, self.image_threshold, self.score_min, self.score_max)

    def normalize_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Anomaly maps -> [0, 1], the pixel threshold at 0.5."""
        if self.map_min is None or self.map_max is None:
            raise ValueError("this postprocessor was fitted without maps: it cannot normalise maps")
        return _normalize(maps, self.pixel_threshold, self.map_min, self.map_max)

    def predict(
        self, scores: torch.Tensor, maps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bool image labels (N,) and pixel masks (N, H, W) (None without maps)."""
        return scores >= self.image_threshold, None if maps is None else maps >= self.pixel_threshold


def fit_postprocessor(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
) -> Postprocessor:
    """Fit on validation data. The pixel threshold comes from the masks when given, else it is
    the image threshold (meaningful when the image score is on the map's scale, e.g. its max)."""
    if masks is not None and maps is None:
        raise ValueError("fitting a pixel threshold from masks needs the maps too")
    image_threshold = f1_optimal_threshold(image_scores, image_labels)
    return Postprocessor(
        image_threshold=image_threshold,
        pixel_threshold=image_threshold if masks is None else f1_optimal_threshold(maps, masks),
        score_min=float(image_scores.min()),
        score_max=float(image_scores.max()),
        map_min=None if maps is None else float(maps.min()),
        map_max=None if maps is None else float(maps.max()),
    )


def stratified_folds(image_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Fold 0 or 1 per image: each label's images shuffled (seeded) and dealt alternately."""
    generator = torch.Generator().manual_seed(int(seed))
    labels = image_labels.reshape(-1).cpu()
    folds = torch.empty(labels.numel(), dtype=torch.long)
    dealt = 0  # continue alternating across labels so odd-sized classes do not all favour fold 0
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        folds[members] = (torch.arange(members.numel()) + dealt) % 2
        dealt += members.numel()
    return folds


def fold_postprocessors(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    maps: torch.Tensor | None,
    masks: torch.Tensor | None,
    seed: int,
    *,
    folds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[Postprocessor, Postprocessor]]:
    """The fold (0/1) of every image and, per fold f, the postprocessor that scores it: fitted on
    the other fold only. ``folds`` overrides the seeded :func:`stratified_folds` split."""
    if image_scores.numel() < 2:
        raise ValueError("cross-fitting thresholds needs at least 2 test images")
    folds = stratified_folds(image_labels, seed) if folds is None else folds.reshape(-1).long().cpu()
    if not (bool((folds == 0).any()) and bool((folds == 1).any())):
        raise ValueError("cross-fitting needs images in both folds 0 and 1")
    posts = []
    for fold in (0, 1):
        fitted_on = torch.nonzero(folds != fold).squeeze(1)
        posts.append(fit_postprocessor(
            image_scores[fitted_on],
            image_labels[fitted_on],
            None if maps is None else maps[fitted_on],
            None if masks is None else masks[fitted_on],
        ))
    return folds, (posts[0], posts[1])


def cross_fit(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    maps: torch.Tensor | None,
    masks: torch.Tensor | None,
    seed: int,
    *,
    folds: torch.Tensor | None = None,
    fitted: tuple[torch.Tensor, tuple[Postprocessor, Postprocessor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Predict and normalise a test set that has no validation split, 2-fold (see module doc).

    Returns ``(pred_labels, pred_masks, normalized_scores, normalized_maps)`` in the input
    order; the map outputs are None when ``maps`` is None. ``folds`` (0/1 per image)
    overrides the seeded :func:`stratified_folds` split; ``fitted`` passes the result of
    :func:`fold_postprocessors` when the caller needs it too (no second fit).
    """
    folds, posts = fitted or fold_postprocessors(image_scores, image_labels, maps, masks, seed, folds=folds)
    pred_labels = torch.empty(image_scores.shape, dtype=torch.bool)
    normalized_scores = torch.empty_like(image_scores)
    pred_masks = None if maps is None else torch.empty(maps.shape, dtype=torch.bool)
    normalized_maps = None if maps is None else torch.empty_like(maps)
    for fold, post in enumerate(posts):
        scored = torch.nonzero(folds == fold).squeeze(1)
        fold_maps = None if maps is None else maps[scored]  # a copy of this fold only
        fold_labels, fold_masks = post.predict(image_scores[scored], fold_maps)
        pred_labels[scored] = fold_labels
        normalized_scores[scored] = post.normalize_scores(image_scores[scored])
        if maps is not None:
            pred_masks[scored] = fold_masks
            normalized_maps[scored] = post.normalize_maps(fold_maps)
        del fold_maps, fold_masks
    return pred_labels, pred_masks, normalized_scores, normalized_maps


def save_postprocessor(path: Path, post: Postprocessor, fitted_on: str) -> None:
    """``post`` as JSON (atomic), with a note of the images it was fitted on."""
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"postprocessor": asdict(post), "fitted_on": fitted_on}, indent=2))
    os.replace(tmp, path)


def load_postprocessor(path: Path) -> tuple[Postprocessor, str]:
    """The postprocessor saved by :func:`save_postprocessor` and what it was fitted on."""
    try:
        payload = json.loads(Path(path).read_text())
        return Postprocessor(**payload["postprocessor"]), str(payload["fitted_on"])
    except FileNotFoundError:
        raise DataError(f"{path} is missing: the run did not finish or was written by an older version; re-run it") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a saved postprocessor ({type(err).__name__}: {err})") from None
