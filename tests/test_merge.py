"""Merging tile outputs: image scores and labels, the seam band, seam smoothing, merge configs."""

import pytest
import torch
from omegaconf import OmegaConf

from tiled_hydra.core.merge import merge_scores, seam_band_mask, smooth_seams
from tiled_hydra.core.tiling import TileGrid

ST9 = TileGrid.create(512, 256, 128)  # seams at 128, 256, 384 on both axes
ST4 = TileGrid.create(512, 256, 256)  # one seam at 256 on both axes


def test_mean_is_eq5_and_max_takes_the_worst_tile():
    tile_scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    assert merge_scores(tile_scores).tolist() == [3.0, 1.0]  # default is the mean
    assert merge_scores(tile_scores, "mean").tolist() == [3.0, 1.0]
    assert merge_scores(tile_scores, "max").tolist() == [6.0, 4.0]
    with pytest.raises(ValueError, match="mean' or 'max"):
        merge_scores(tile_scores, "median")


def test_band_is_ten_percent_of_the_tile_on_each_side_st9():
    # By hand: 0.1 x 256 = 25.6 -> 26 px each side, so each seam's band is 52 px wide:
    # columns [102, 154), [230, 282), [358, 410) -> 156 columns, and the same rows.
    # Pixels in the band: 512^2 - (512 - 156)^2 = 262144 - 126736 = 135408.
    band = seam_band_mask(ST9)
    assert band.shape == (512, 512) and band.dtype == torch.bool
    assert int(band.sum()) == 135408
    band_columns = torch.zeros(512, dtype=torch.bool)
    for start in (102, 230, 358):
        band_columns[start : start + 52] = True
    assert torch.equal(band[0], band_columns)  # row 0 is outside every row band
    assert torch.equal(band[:, 0], band_columns)
    assert bool(band[256].all()) and bool(band[:, 153].all())


def test_band_st4_and_single_tile():
    # One seam at 256: band [230, 282) = 52 rows and columns -> 512^2 - 460^2 = 50544 pixels.
    assert int(seam_band_mask(ST4).sum()) == 50544
    assert not bool(seam_band_mask(TileGrid.create(256, 256, 256)).any())


def test_band_uses_tile_height_for_row_seams_and_width_for_column_seams():
    # Image 64 x 128, tiles 32 x 64: one row seam at 32 (band round(3.2) = 3 -> rows 29..34)
    # and one column seam at 64 (band round(6.4) = 6 -> columns 58..69).
    # Pixels: 6 rows x 128 + 12 columns x 64 - 6 x 12 (counted twice) = 1464.
    band = seam_band_mask(TileGrid.create((64, 128), (32, 64), (32, 64)))
    assert int(band.sum()) == 1464
    assert torch.nonzero(band[:, 0]).squeeze(1).tolist() == list(range(29, 35))
    assert torch.nonzero(band[0]).squeeze(1).tolist() == list(range(58, 70))


def test_constant_map_is_unchanged_by_smoothing():
    maps = torch.full((2, 512, 512), 0.7)
    torch.testing.assert_close(smooth_seams(maps, ST9), maps)


def test_step_on_a_seam_is_smoothed_inside_the_band_only():
    maps = torch.zeros(1, 512, 512)
    maps[..., 256:] = 1.0  # a step edge exactly on the st4 column seam
    band = seam_band_mask(ST4)
    for sigma in (2.0, 10.0):  # sigma 10: the kernel (radius 30) reaches past the 26 px band
        smoothed = smooth_seams(maps, ST4, sigma=sigma)
        assert torch.equal(smoothed[0][~band], maps[0][~band])  # bit for bit outside the band
        assert bool(((smoothed[0, :, 250:262] > 0) & (smoothed[0, :, 250:262] < 1)).all())  # smoothed across it
    assert torch.equal(maps[0, 0, 255:257], torch.tensor([0.0, 1.0]))  # the input is not modified
    row = smooth_seams(maps, ST4, sigma=2.0)[0, 0]
    assert bool((row[1:] >= row[:-1]).all())  # still a monotone edge, now a ramp
    assert row[255] == pytest.approx(1 - float(row[256]))  # symmetric about the seam


def test_no_seams_returns_the_input():
    maps = torch.rand(2, 64, 64)
    assert smooth_seams(maps, TileGrid.create(64, 64, 64)) is maps


def test_merge_configs_match_the_function_arguments(compose_cfg):
    chosen = {}
    for name in ("default", "max", "no_smoothing"):
        chosen[name] = compose_cfg([f"merge={name}", "~dataset"]).merge  # dataset is irrelevant here
    assert chosen["default"].score == "mean" and chosen["max"].score == "max"
    assert chosen["default"].seam_smoothing.enabled and chosen["max"].seam_smoothing.enabled
    assert not chosen["no_smoothing"].seam_smoothing.enabled
    assert chosen["no_smoothing"].score == "mean"

    smoothing = OmegaConf.to_container(chosen["default"].seam_smoothing)
    assert smoothing == {"enabled": True, "sigma": 2.0, "width_fraction": 0.1}
    smoothing.pop("enabled")
    maps = torch.rand(1, 64, 64)
    grid = TileGrid.create(64, 32, 32)
    torch.testing.assert_close(smooth_seams(maps, grid, **smoothing), smooth_seams(maps, grid))
    assert merge_scores(torch.ones(1, 4), score=chosen["max"].score).item() == 1.0
