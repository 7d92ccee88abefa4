"""Region recall at fixed pixel false-positive rates (metrics/pixel.py) on hand-made maps and masks:
the threshold per rate from the test set's normal pixels, and the regions found, counted by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tiled_hydra.data.base import Split
from tiled_hydra.errors import ConfigError
from tiled_hydra.metrics import pixel
from tiled_hydra.metrics.pixel import fpr_thresholds, pixel_metrics, region_scores


def metrics_cfg(**overrides):
    cfg = dict(resolution="setup", fallback_resolution=512, aupro_fpr_limit=0.3, strict_fpr_limit=0.05,
               region_overlap=0.5, region_size_bins=[0.02], region_fprs=[0.01, 0.05, 0.1])
    return OmegaConf.create(cfg | overrides)


def hand_case() -> tuple[torch.Tensor, Split]:
    """One 10 x 10 image (100 px): region A = 1 px (1 % of the image), region B = 2 x 2 px (4 %).

    The 95 normal pixels score 0.00, 0.01, ..., 0.94 (each once); A scores 0.93; B's four pixels
    score 0.99, 0.91, 0.50, 0.40.
    """
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 0] = True  # A
    mask[5:7, 5:7] = True  # B
    values = np.zeros((10, 10), dtype=np.float32)
    values[~mask] = np.arange(95) / 100
    values[0, 0] = 0.93
    values[5:7, 5:7] = [[0.99, 0.91], [0.50, 0.40]]
    split = Split(torch.zeros(1, 3, 10, 10, dtype=torch.uint8), torch.tensor([1]), torch.from_numpy(mask)[None])
    return torch.from_numpy(values)[None], split


def test_region_recall_at_fixed_fpr_equals_a_hand_count():
    maps, split = hand_case()
    results = pixel_metrics(maps, split, torch.tensor([0.2]), metrics_cfg())
    # FPR 0.01: at most floor(0.95) = 0 of 95 normal pixels above t -> t = the largest normal value 0.94.
    #   A (0.93) is not above it. B needs ceil(0.5 x 4) = 2 pixels above: 0.99 only -> missed.
    # FPR 0.05: at most floor(4.75) = 4 above -> t = the 5th largest, 0.90: A (0.93) found; B: 0.99, 0.91 -> found.
    # FPR 0.1: at most floor(9.5) = 9 above -> t = the 10th largest, 0.85: both found.
    assert results["region_recall_at_fpr"] == {"0.01": {"<2%": 0.0, ">=2%": 0.0},
                                               "0.05": {"<2%": 1.0, ">=2%": 1.0},
                                               "0.1": {"<2%": 1.0, ">=2%": 1.0}}
    assert results["region_count_by_size"] == {"<2%": 1, ">=2%": 1}
    # The thresholded view stays, named by its threshold: at 0.2 every normal pixel >= 0.2 floods the image,
    # and both regions are "found" (B: 0.99, 0.91, 0.50, 0.40 all >= 0.2).
    assert results["region_recall_by_size"] == {"<2%": 1.0, ">=2%": 1.0}
    assert results["region_recall_threshold"] == "validation-fitted pixel threshold 0.2"


def test_thresholds_leave_at_most_the_share_of_normal_pixels_above():
    maps, split = hand_case()
    normal = maps[0][~split.masks[0]]
    thresholds = fpr_thresholds(normal, [0.01, 0.05, 0.1])
    assert thresholds == pytest.approx({0.01: 0.94, 0.05: 0.90, 0.1: 0.85})
    for f, t in thresholds.items():
        assert int((normal > t).sum()) == math.floor(f * 95)  # distinct values: exactly floor(f N) above
    assert math.isnan(fpr_thresholds(torch.zeros(0), [0.05])[0.05])  # no normal pixel: no threshold


def test_region_score_is_the_overlap_quantile():
    # regions 1 (3 px: 0.1, 0.7, 0.4) and 2 (1 px: 0.2); overlap 0.5 -> k = ceil(1.5) = 2 and ceil(0.5) = 1
    regions = np.array([[1, 1, 1, 2]])
    values = np.array([[0.1, 0.7, 0.4, 0.2]])
    scores = region_scores(values, regions, np.array([0, 3, 1]), 0.5)
    assert scores.tolist() == [0.4, 0.2]  # region 1 is found above a threshold t exactly when 2 of its pixels are: t < 0.4


def test_streamed_thresholds_give_the_same_recall(monkeypatch):
    maps, split = hand_case()
    exact = pixel_metrics(maps, split, torch.tensor([0.2]), metrics_cfg())
    monkeypatch.setattr(pixel, "EXACT_PIXEL_LIMIT", 0)  # the histogram path of large test sets
    streamed = pixel_metrics(maps, split, torch.tensor([0.2]), metrics_cfg())
    assert isinstance(streamed["pixel_thresholds"], int)  # 100 distinct values < 2^16 thresholds: each one an edge
    assert streamed["region_recall_at_fpr"] == exact["region_recall_at_fpr"]


def test_a_region_only_half_found_counts_at_the_overlap():
    # B's second-best pixel (0.91) lowered to 0.89: at FPR 0.05 (t = 0.90) only 1 of its 4 pixels is above
    maps, split = hand_case()
    maps[0, 5, 6] = 0.89
    results = pixel_metrics(maps, split, torch.tensor([0.2]), metrics_cfg())
    assert results["region_recall_at_fpr"]["0.05"] == {"<2%": 1.0, ">=2%": 0.0}
    assert pixel_metrics(maps, split, torch.tensor([0.2]), metrics_cfg(region_overlap=0.25))["region_recall_at_fpr"]["0.05"] \
        == {"<2%": 1.0, ">=2%": 1.0}  # overlap 0.25: one pixel of four is enough


@pytest.mark.parametrize("bad", [[0.0], [1.0], [-0.1], ["x"]])
def test_bad_fprs_are_one_line_config_errors(bad):
    maps, split = hand_case()
    with pytest.raises(ConfigError) as err:
        pixel_metrics(maps, split, torch.tensor([0.2]), metrics_cfg(region_fprs=bad))
    assert "metrics.region_fprs" in str(err.value) and "\n" not in str(err.value)


# -- compare's figure -------------------------------------------------------------------------------
def run_record(setup: str, at_fpr: dict | None, by_size: dict) -> dict:
    """A run as compare reads it from results.json (the keys the figure uses)."""
    record = {"dataset": "mvtec", "category": "bottle", "model": "padim", "setup": setup, "seed": 0,
              "region_recall_by_size": by_size}
    return record | ({"region_recall_at_fpr": at_fpr} if at_fpr is not None else {})


def test_compare_draws_the_fixed_fpr_view_by_default():
    from tiled_hydra.analysis.significance import recall_figure

    at_fpr = {"0.01": {"<2%": 0.25, ">=2%": 0.5}, "0.05": {"<2%": 0.5, ">=2%": 1.0}}
    runs = [run_record("sm256", at_fpr, {"<2%": 1.0, ">=2%": 1.0}), run_record("ens9", at_fpr, {"<2%": 0.0, ">=2%": 0.0})]
    fig, note = recall_figure(runs)
    assert note is None
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["padim on mvtec\nat pixel FPR 0.01 on normal test pixels", "padim on mvtec\nat pixel FPR 0.05 on normal test pixels"]
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [0.25, 0.5]  # the 0.01 row, not the thresholded view's 1.0
    fig, _ = recall_figure(runs, view="threshold")
    assert [ax.get_title() for ax in fig.axes] == ["padim on mvtec\nat the validation-fitted pixel threshold"]
    # runs written before the fixed-rate view: the thresholded view, and a note saying so
    fig, note = recall_figure([run_record("sm256", None, {"<2%": 1.0, ">=2%": 1.0})])
    assert fig.axes[0].get_title().endswith("at the validation-fitted pixel threshold") and "no run reports region_recall_at_fpr" in note
