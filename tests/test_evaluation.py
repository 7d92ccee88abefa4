"""Pixel metrics at one resolution for every setup (evaluation.py): hand computations, the exact and
the streamed sweep against each other, region recall by size, and the resolution setting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tiled_hydra.metrics import pixel as evaluation
from tiled_hydra.data.base import Split
from tiled_hydra.data.images import resize_mask
from tiled_hydra.errors import ConfigError
from tiled_hydra.metrics.pixel import pixel_metrics, resolve_resolution
from tiled_hydra.metrics.curves import compute_metrics


def metrics_cfg(**overrides):
    cfg = dict(resolution="auto", fallback_resolution=512, aupro_fpr_limit=0.3, strict_fpr_limit=0.05,
               region_overlap=0.5, region_size_bins=[0.0001, 0.001, 0.01])
    return OmegaConf.create(cfg | overrides)


def split_with_native_masks(tmp_path, native_masks: list[np.ndarray], setup_size: tuple[int, int]) -> Split:
    """A test split whose masks live in files at their own size, resized for the setup as the loaders do."""
    paths = []
    for i, mask in enumerate(native_masks):
        path = tmp_path / f"{i}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        paths.append(str(path) if mask.any() else None)
    return Split(
        images=torch.zeros(len(native_masks), 3, *setup_size, dtype=torch.uint8),
        labels=torch.tensor([int(m.any()) for m in native_masks]),
        masks=torch.stack([torch.from_numpy(resize_mask(m, setup_size)) for m in native_masks]),
        native_sizes=[m.shape for m in native_masks],
        mask_paths=paths,
    )


def test_native_resolution_keeps_a_one_pixel_defect_that_downsizing_erases(tmp_path):
    # A 4x4 image whose only defect is pixel (0, 0); nearest-neighbour downsizing to the setup's
    # 2x2 samples pixels (1, 1), (1, 3), (3, 1), (3, 3) and erases it.
    native = np.zeros((4, 4), dtype=bool)
    native[0, 0] = True
    split = split_with_native_masks(tmp_path, [native], (2, 2))
    assert not split.masks.any()
    maps = torch.tensor([[[2.0, 4.0], [0.0, 0.0]]])
    # Bilinear (half-pixel centres) upsampling to 4x4: source coordinates -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1]. Row 0: 2, 2.5, 3.5, 4; row 1 (0.75 row 0): 1.5, 1.875, 2.625, 3; rows 2-3 lower.
    # The defect pixel scores 2; 5 of the 15 normal pixels score higher (2.5, 3.5, 4, 2.625, 3).
    # So PRO = TPR = 0 until FPR = 5/15, then 1: the area up to FPR 1 is 1 - 1/3 = 2/3, up to 0.3 it is 0.
    # Precision at full recall: 1 / 6 -> AP = 1/6.
    cfg = metrics_cfg(resolution="native", aupro_fpr_limit=1.0, strict_fpr_limit=0.3)
    native_results = pixel_metrics(maps, split, torch.tensor([2.0]), cfg)
    assert native_results["pixel_AUPRO"] == pytest.approx(2 / 3)
    assert native_results["pixel_AUROC"] == pytest.approx(2 / 3)
    assert native_results["pixel_AUPRO_05"] == pytest.approx(0.0)
    assert native_results["pixel_AP"] == pytest.approx(1 / 6)
    # threshold 2: the 1-px region (1/16 = 6.25 % of the image) is detected; F1 = 2 / (2 + 5 + 0)
    assert native_results["region_recall_by_size"][">=1%"] == 1.0
    assert native_results["region_count_by_size"] == {"<0.01%": 0, "0.01-0.1%": 0, "0.1-1%": 0, ">=1%": 1}
    assert native_results["pixel_F1"] == pytest.approx(2 / 7)
    assert native_results["metrics_resolution"] == "native"
    missed = pixel_metrics(maps, split, torch.tensor([2.5]), cfg)
    assert missed["region_recall_by_size"][">=1%"] == 0.0
    # At the setup's resolution the defect is gone: no anomalous pixel, the pixel metrics are undefined.
    at_setup = pixel_metrics(maps, split, torch.tensor([2.0]), metrics_cfg(resolution="setup"))
    assert math.isnan(at_setup["pixel_AUPRO"]) and at_setup["region_count_by_size"][">=1%"] == 0


def random_case(generator: torch.Generator, n: int = 4, size: int = 24):
    maps = torch.rand(n, size, size, generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n - 1):  # the last image stays normal
        y, x = torch.randint(0, size - 6, (2,), generator=generator).tolist()
        masks[i, y : y + 5, x : x + 4] = True
        maps[i, y : y + 5, x : x + 4] += 0.5  # detectable, not perfectly
    maps = (maps * 64).round() / 64  # ties on purpose
    return maps, masks


def test_setup_resolution_equals_the_papers_metrics():
    maps, masks = random_case(torch.Generator().manual_seed(0))
    split = Split(images=torch.zeros(len(maps), 3, 24, 24, dtype=torch.uint8), labels=masks.flatten(1).any(1).long(), masks=masks)
    threshold = 0.9
    ours = pixel_metrics(maps, split, torch.full((len(maps),), threshold), metrics_cfg(resolution="setup"))
    reference = compute_metrics(torch.zeros(len(maps)), split.labels, split.labels.bool(), maps=maps, masks=masks,
                                pred_masks=maps >= threshold)
    for key in ("pixel_AUROC", "pixel_AUPRO"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-12)
    assert ours["pixel_F1"] == pytest.approx(reference["pixel_F1"], abs=1e-6)  # torchmetrics returns float32
    assert ours["metrics_resolution"] == "setup" and ours["pixel_thresholds"] == "all"


def test_streamed_sweep_equals_the_exact_one(monkeypatch, tmp_path):
    maps, masks = random_case(torch.Generator().manual_seed(1))
    split = split_with_native_masks(tmp_path, list(masks.numpy()), (24, 24))
    thresholds = torch.full((len(maps),), 0.8)
    exact = pixel_metrics(maps, split, thresholds, metrics_cfg(resolution="native"))
    monkeypatch.setattr(evaluation, "EXACT_PIXEL_LIMIT", 0)  # force the streamed histograms
    streamed = pixel_metrics(maps, split, thresholds, metrics_cfg(resolution="native"))
    # 65 distinct map values (multiples of 1/64) < 2^16 thresholds: every value is a threshold, so equal
    assert isinstance(streamed["pixel_thresholds"], int)
    for key in ("pixel_AUROC", "pixel_AUPRO", "pixel_AUPRO_05", "pixel_AP", "pixel_F1"):
        assert streamed[key] == pytest.approx(exact[key], abs=1e-12)
    assert streamed["region_recall_by_size"] == exact["region_recall_by_size"]


def test_streamed_sweep_upsampled_stays_close_to_exact(monkeypatch, tmp_path):
    # Upsampled maps take values between the thresholds: only the set of thresholds is coarser.
    maps, masks = random_case(torch.Generator().manual_seed(2), size=24)
    big = [np.kron(m, np.ones((3, 3), dtype=bool)) for m in masks.numpy()]  # the same defects at 72 px
    split = split_with_native_masks(tmp_path, big, (24, 24))
    thresholds = torch.full((len(maps),), 0.8)
    exact = pixel_metrics(maps, split, thresholds, metrics_cfg(resolution="native"))
    monkeypatch.setattr(evaluation, "EXACT_PIXEL_LIMIT", 0)
    monkeypatch.setattr(evaluation, "STREAM_THRESHOLDS", 512)  # ~7,500 distinct values share 512 thresholds
    streamed = pixel_metrics(maps, split, thresholds, metrics_cfg(resolution="native"))
    assert streamed["pixel_thresholds"] <= 512
    # measured here: AUROC 1.3e-4, AUPRO 4.3e-4, AP 8.2e-3 off (AP's step-wise precision is the most
    # sensitive); at the default 2^16 thresholds the bins are 128x finer
    assert streamed["pixel_AUROC"] == pytest.approx(exact["pixel_AUROC"], abs=1e-3)
    assert streamed["pixel_AUPRO"] == pytest.approx(exact["pixel_AUPRO"], abs=1e-3)
    assert streamed["pixel_AP"] == pytest.approx(exact["pixel_AP"], abs=2e-2)
    assert streamed["pixel_F1"] == exact["pixel_F1"]  # counted per pixel at the fitted threshold: exact


def test_streamed_per_image_histograms_bin_each_image_on_their_own_thresholds(monkeypatch, tmp_path):
    # Streamed, an image's coarse (bootstrap) histogram is summed from its fine bins; it must equal
    # binning the image's values on the coarse thresholds directly.
    maps, masks = random_case(torch.Generator().manual_seed(3), size=24)
    big = [np.kron(m, np.ones((3, 3), dtype=bool)) for m in masks.numpy()]
    split = split_with_native_masks(tmp_path, big, (24, 24))
    monkeypatch.setattr(evaluation, "EXACT_PIXEL_LIMIT", 0)
    monkeypatch.setattr(evaluation, "STREAM_THRESHOLDS", 512)
    monkeypatch.setattr(evaluation, "PER_IMAGE_THRESHOLDS", 40)
    per_image: dict = {}
    pixel_metrics(maps, split, torch.full((len(maps),), 0.8), metrics_cfg(resolution="native"), per_image=per_image)
    edges = torch.from_numpy(per_image["edges"])
    assert len(edges) <= 40 and edges[0] == -math.inf and bool((edges[1:] > edges[:-1]).all())
    for i in range(len(maps)):
        values = evaluation.map_at(maps[i], big[i].shape).reshape(-1).double()
        bins = (torch.searchsorted(edges, values, right=True) - 1).numpy()
        inside = big[i].reshape(-1)
        assert np.array_equal(per_image["normal"][i], np.bincount(bins[~inside], minlength=len(edges)))
        assert np.array_equal(per_image["anomalous"][i], np.bincount(bins[inside], minlength=len(edges)))


def test_region_recall_by_size_on_hand_made_masks(tmp_path):
    # A 100 x 200 image (20,000 px) with regions of 1, 10, 100 and 400 px: 0.005 %, 0.05 %, 0.5 %, 2 %.
    mask = np.zeros((100, 200), dtype=bool)
    mask[5, 5] = True  # 1 px
    mask[20, 20:30] = True  # 10 px
    mask[40:50, 40:50] = True  # 100 px
    mask[60:80, 100:120] = True  # 400 px
    anomaly_map = np.zeros((100, 200), dtype=np.float32)
    anomaly_map[5, 5] = 1  # detected
    anomaly_map[20, 20:24] = 1  # 4 of 10 px: below the 0.5 overlap
    anomaly_map[40:50, 40:50] = 1  # detected
    anomaly_map[60:70, 100:120] = 1  # exactly half: detected (overlap >= 0.5)
    split = split_with_native_masks(tmp_path, [mask], (100, 200))
    results = pixel_metrics(torch.from_numpy(anomaly_map)[None], split, torch.tensor([0.5]), metrics_cfg(resolution="native"))
    assert results["region_recall_by_size"] == {"<0.01%": 1.0, "0.01-0.1%": 0.0, "0.1-1%": 1.0, ">=1%": 1.0}
    assert list(results["region_recall_by_size"]) == ["<0.01%", "0.01-0.1%", "0.1-1%", ">=1%"]  # smallest first
    without_small = mask.copy()
    without_small[5, 5] = False
    split = split_with_native_masks(tmp_path, [without_small], (100, 200))
    results = pixel_metrics(torch.from_numpy(anomaly_map)[None], split, torch.tensor([0.5]), metrics_cfg(resolution="native"))
    assert math.isnan(results["region_recall_by_size"]["<0.01%"])  # empty bin: NaN, never 0


def test_resolution_setting():
    same = Split(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), None,
                 native_sizes=[(30, 40), (30, 40)], mask_paths=[None, "m.png"])
    mixed = Split(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), None,
                  native_sizes=[(30, 40), (60, 40)], mask_paths=[None, "m.png"])
    unknown = Split(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), None)
    assert resolve_resolution("auto", same, 512) == ("native", None)
    assert resolve_resolution("auto", mixed, 512) == ("fixed", (512, 512))
    assert resolve_resolution("auto", unknown, 512) == ("setup", None)
    assert resolve_resolution("native", mixed, 512) == ("native", None)
    assert resolve_resolution(OmegaConf.create({"r": [100, 150]}).r, mixed, 512) == ("fixed", (100, 150))
    for bad in ("big", 0, -5, [1, 2, 3], 2.5, True):
        with pytest.raises(ConfigError, match="metrics.resolution"):
            resolve_resolution(bad, same, 512)
    with pytest.raises(ConfigError, match="native"):
        resolve_resolution("native", unknown, 512)


@pytest.mark.parametrize("override", ["metrics.resolution=abc", "metrics.resolution=0", "metrics.resolution=[1,2,3]",
                                      "metrics.fallback_resolution=-1", "metrics.region_size_bins=[0.1,0.01]",
                                      "metrics.region_size_bins=[]", "metrics.region_overlap=0", "metrics.strict_fpr_limit=2"])
def test_bad_metrics_settings_are_refused_before_any_data_loads(compose_cfg, override):
    from tiled_hydra.config import validate

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        validate(compose_cfg(["+setup=sm256", override]))


@pytest.mark.parametrize("override", ["metrics.resolution=native", "metrics.resolution=setup", "metrics.resolution=1024",
                                      "metrics.resolution=[800,1200]"])
def test_metrics_resolution_settings_compose(compose_cfg, override):
    from tiled_hydra.config import validate

    validate(compose_cfg(["+setup=sm256", override]))


def test_results_file_keeps_the_size_bins_in_order(tmp_path):
    import json

    from tiled_hydra.rundir import write_json_atomic

    write_json_atomic(tmp_path / "results.json", {"z": 1, "region_recall_by_size": {"<0.01%": 1.0, "0.01-0.1%": 0.5, ">=1%": 0.0}})
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert list(loaded) == ["region_recall_by_size", "z"]
    assert list(loaded["region_recall_by_size"]) == ["<0.01%", "0.01-0.1%", ">=1%"]
