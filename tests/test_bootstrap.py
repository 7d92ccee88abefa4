"""Bootstrap intervals over test images and the paired comparison (bootstrap.py), on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tiled_hydra.metrics.bootstrap import (
    Difference, PerImage, image_auroc, interval, load_per_image, pixel_aupro, save_per_image, seed_mean, stratified_draws,
)
from tiled_hydra.data.base import Split
from tiled_hydra.metrics.pixel import pixel_metrics

LABELS = np.array([0] * 20 + [1] * 20)
PATHS = np.array([f"img_{i:02d}.png" for i in range(40)])


def record(scores) -> PerImage:
    return PerImage(PATHS, LABELS, np.asarray(scores, dtype=np.float64))


def paired_difference(a: list[PerImage], b: list[PerImage], metric: str, draws: int) -> Difference:
    """b - a on the same draws of the same images, as compare's intervals (analysis/significance.py) do."""
    weights, ones = stratified_draws(LABELS, draws, seed=0), np.ones((1, len(LABELS)))
    low, high = interval(seed_mean(b, metric, weights) - seed_mean(a, metric, weights))
    return Difference(float(seed_mean(b, metric, ones)[0] - seed_mean(a, metric, ones)[0]), low, high)


def bootstrap_interval(records: list[PerImage], metric: str, draws: int) -> tuple[float, float]:
    return interval(seed_mean(records, metric, stratified_draws(LABELS, draws, seed=0)))


def test_draws_keep_both_classes_and_their_sizes():
    weights = stratified_draws(LABELS, draws=50, seed=1)
    assert (weights[:, :20].sum(1) == 20).all() and (weights[:, 20:].sum(1) == 20).all()
    assert not np.allclose(weights, 1)  # images are drawn again, some twice, some not at all


def test_auroc_with_unit_weights_is_the_auroc():
    # defective scores 10..29, normal 0..19: pairs with s_pos > s_neg: for pos score p, count of neg < p
    scores = np.concatenate([np.arange(20), np.arange(10, 30)]).astype(float)
    wins = sum(min(p, 20) for p in range(10, 30)) + 0.5 * 10  # ties: scores 10..19 meet once each
    assert image_auroc(record(scores), np.ones((1, 40)))[0] == pytest.approx(wins / 400)


def test_paired_difference_known_answers():
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=40) + LABELS
    constant = record(np.zeros(40))  # every pair tied: AUROC 0.5 in every draw
    perfect = record(LABELS.astype(float))  # AUROC 1 in every draw
    gap = paired_difference([constant], [perfect], "image_AUROC", draws=200)
    assert (gap.mean, gap.low, gap.high) == (0.5, 0.5, 0.5) and gap.significant
    same = paired_difference([record(noisy)], [record(noisy + 3.0)], "image_AUROC", draws=200)  # a shift changes no rank
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.significant
    # two noisy scorers of similar quality: the interval straddles 0
    other = record(rng.normal(size=40) + LABELS)
    close = paired_difference([record(noisy)], [other], "image_AUROC", draws=300)
    assert close.low < 0 < close.high and not close.significant
    low, high = bootstrap_interval([record(noisy)], "image_AUROC", draws=300)
    assert low < image_auroc(record(noisy), np.ones((1, 40)))[0] < high


def test_pixel_aupro_from_per_image_histograms_equals_the_run(tmp_path):
    generator = torch.Generator().manual_seed(0)
    maps = (torch.rand(6, 16, 16, generator=generator) * 32).round() / 32  # 33 distinct values < 1024 thresholds
    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    for i in range(4):
        masks[i, 2 + i : 6 + i, 3:7] = True
        maps[i, 2 + i : 6 + i, 3:7] += 0.4
    split = Split(torch.zeros(6, 3, 16, 16, dtype=torch.uint8), masks.flatten(1).any(1).long(), masks)
    cfg = OmegaConf.create(dict(resolution="setup", fallback_resolution=512, aupro_fpr_limit=0.3, strict_fpr_limit=0.05,
                                region_overlap=0.5, region_size_bins=[0.01]))
    per_image: dict = {}
    results = pixel_metrics(maps, split, torch.full((6,), 0.9), cfg, per_image=per_image)
    paths = [f"{i}.png" for i in range(6)]
    save_per_image(tmp_path / "per_image.npz", paths, split.labels, torch.zeros(6), per_image)
    loaded = load_per_image(tmp_path / "per_image.npz")
    assert list(loaded.paths) == paths and loaded.normal.shape == (6, len(per_image["edges"]))
    assert pixel_aupro(loaded, np.ones((1, 6)))[0] == pytest.approx(results["pixel_AUPRO"], abs=1e-12)
    # reversed image order: aligned by path, the same number
    flipped = PerImage(loaded.paths[::-1], loaded.labels[::-1], loaded.scores[::-1], loaded.normal[::-1],
                       loaded.anomalous[::-1], loaded.pro[::-1], loaded.regions[::-1]).aligned(loaded.paths)
    assert pixel_aupro(flipped, np.ones((1, 6)))[0] == pytest.approx(results["pixel_AUPRO"], abs=1e-12)
