"""Bootstrap intervals over test images, and the paired bootstrap that says whether two setups differ.

Every run leaves ``per_image.npz`` next to results.json: image scores, labels and paths, and each
test image's pixel histograms over 1024 thresholds (:func:`tiled_hydra.metrics.pixel.pixel_metrics`).
Drawing the test images again with replacement (stratified by label, so both classes stay present)
and recomputing a metric on every draw gives its sampling distribution: the 95 % interval is the
2.5 and 97.5 percentiles. Several seeds of one configuration are averaged inside every draw.

Two configurations scored on the same test images are compared with the *same* draws (paired):
their difference is significant when its 95 % interval excludes 0. Differences between seeds
(training noise) are in the seed average; the interval is about the test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tiled_hydra.metrics.curves import area_up_to

PER_IMAGE_FILE = "per_image.npz"
DRAWS = 1000


@dataclass
class PerImage:
    """What one run recorded per test image."""

    paths: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int
    scores: np.ndarray  # (N,) float
    normal: np.ndarray | None = None  # (N, K) pixel histograms, None without masks
    anomalous: np.ndarray | None = None
    pro: np.ndarray | None = None
    regions: np.ndarray | None = None  # (N,) ground-truth regions per image

    def aligned(self, paths: np.ndarray) -> "PerImage":
        """The same records in the order of ``paths`` (runs of one dataset list the same images)."""
        if list(self.paths) == list(paths):
            return self
        index = {p: i for i, p in enumerate(self.paths)}
        if set(index) != set(paths):
            raise ValueError("runs were scored on different test images: no paired comparison")
        order = np.array([index[p] for p in paths])
        pick = (lambda a: None if a is None else a[order])
        return PerImage(self.paths[order], self.labels[order], self.scores[order], pick(self.normal),
                        pick(self.anomalous), pick(self.pro), pick(self.regions))


def save_per_image(path: Path, paths: list[str], labels, scores, pixel: dict | None) -> None:
    arrays = {"paths": np.array(paths, dtype=str), "labels": np.asarray(labels, dtype=np.int64),
              "scores": np.asarray(scores, dtype=np.float64)}
    if pixel:
        arrays |= {k: pixel[k] for k in ("normal", "anomalous", "pro", "regions")}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_per_image(path: Path) -> PerImage | None:
    if not path.exists():
        return None
    with np.load(path) as data:
        get = (lambda k: data[k] if k in data.files else None)
        return PerImage(data["paths"], data["labels"], data["scores"], get("normal"), get("anomalous"), get("pro"), get("regions"))


def stratified_draws(labels: np.ndarray, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, N) multiplicities: per draw, each label's images drawn again as many times as it has images."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((draws, len(labels)))
    for label in np.unique(labels):
        members = np.nonzero(labels == label)[0]
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), size=draws)
    return weights


# -- metrics under image multiplicities ----------------------------------------------------------------
def image_auroc(record: PerImage, weights: np.ndarray) -> np.ndarray:
    """AUROC of every draw (weights (D, N)): P(defective score > normal score), ties one half."""
    positive, negative = record.labels == 1, record.labels == 0
    if not positive.any() or not negative.any():
        return np.full(len(weights), math.nan)
    s_pos, s_neg = record.scores[positive], record.scores[negative]
    wins = (s_pos[:, None] > s_neg[None, :]) + 0.5 * (s_pos[:, None] == s_neg[None, :])  # (P, Q)
    w_pos, w_neg = weights[:, positive], weights[:, negative]
    return np.einsum("dp,pq,dq->d", w_pos, wins, w_neg) / (w_pos.sum(1) * w_neg.sum(1))


def pixel_aupro(record: PerImage, weights: np.ndarray, fpr_limit: float = 0.3) -> np.ndarray:
    """AUPRO of every draw from the per-image histograms (curves at the run's 1024 thresholds)."""
    if record.normal is None:
        return np.full(len(weights), math.nan)
    out = np.empty(len(weights))
    normal = (weights @ record.normal)[:, ::-1].cumsum(1)  # highest threshold first
    pro = (weights @ record.pro)[:, ::-1].cumsum(1)
    regions = weights @ record.regions
    for d in range(len(weights)):
        if normal[d, -1] == 0 or regions[d] == 0:
            out[d] = math.nan
            continue
        fpr = torch.from_numpy(np.concatenate([[0.0], normal[d] / normal[d, -1]]))
        curve = torch.from_numpy(np.concatenate([[0.0], pro[d] / regions[d]]))
        out[d] = area_up_to(fpr, curve, fpr_limit)
    return out


METRICS = {"image_AUROC": image_auroc, "pixel_AUPRO": pixel_aupro}


def seed_mean(records: list[PerImage], metric: str, weights: np.ndarray) -> np.ndarray:
    return np.mean([METRICS[metric](r, weights) for r in records], axis=0)


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Difference:
    mean: float  # b - a, seed-averaged, on all test images
    low: float
    high: float

    @property
    def significant(self) -> bool:
        return bool(self.low > 0 or self.high < 0)
