"""Slots on one scale (core/calibration.py), window blending, and the block contrast that measures
tile artefacts of merged maps (metrics/seams.py), on hand-made slot maps with known offsets."""

from __future__ import annotations

import pytest
import torch

from tiled_hydra.core.calibration import MIN_POSITION_TILES, fit_calibration, tile_window
from tiled_hydra.core.filters import gaussian_blur
from tiled_hydra.core.tiling import TileGrid
from tiled_hydra.metrics.seams import block_contrast, map_spread, seam_ridge

ENS4 = TileGrid.create(512, 256, 256)  # seams at 256
ENS9 = TileGrid.create(512, 256, 128)  # seams at 128, 256, 384
# slot k's outputs = GAIN[k] * (a common normal response) + OFFSET[k]: four slots on four scales
GAIN = torch.tensor([1.0, 3.0, 0.5, 2.0])
OFFSET = torch.tensor([0.0, 5.0, -2.0, 10.0])


def normal_fields(n: int, seed: int, size: int = 512) -> torch.Tensor:
    """Smooth random 'anomaly maps of normal images' (n, size, size), all on one scale."""
    g = torch.Generator().manual_seed(seed)
    return gaussian_blur(torch.rand(n, size, size, generator=g), 6.0) * 10


def merge(grid: TileGrid, slot_maps: list[torch.Tensor], window: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one tile map per slot (slot k = tile k), as the engine does: window-weighted sum / coverage."""
    total = torch.zeros(slot_maps[0].shape[0], *grid.image_size)
    for tile, maps in enumerate(slot_maps):
        grid.add_tile(total, maps if window is None else maps * window, tile)
    return total / grid.coverage(window)


@pytest.mark.parametrize("mode", ["slot", "slot_position"])
def test_calibration_removes_known_slot_offsets_and_gains_exactly(mode):
    calibration_tiles = ENS4.tile(normal_fields(6, seed=0)[:, None])[:, :, 0]  # (6, 4, 256, 256)
    test_tiles = ENS4.tile(normal_fields(2, seed=1)[:, None])[:, :, 0]
    calibrated = []
    for k in range(4):
        # every slot sees the same normal response on its own scale; position mode gets enough tiles
        reps = MIN_POSITION_TILES if mode == "slot_position" else 1
        normal = (GAIN[k] * calibration_tiles[:, 0] + OFFSET[k]).repeat(reps, 1, 1)
        stats = fit_calibration(normal, normal.mean(dim=(-2, -1)))
        assert (stats.position_median is not None) == (mode == "slot_position")
        maps = GAIN[k] * test_tiles[:, 0] + OFFSET[k]  # the same test content through every slot
        out, scores = stats.apply(maps, maps.mean(dim=(-2, -1)), mode)
        calibrated.append((out, scores))
    for out, scores in calibrated[1:]:  # a gain and an offset per slot: removed up to float32 rounding
        torch.testing.assert_close(out, calibrated[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores, calibrated[0][1], atol=1e-4, rtol=1e-4)


def test_block_contrast_of_quadrant_levels_is_the_hand_count():
    # quadrant levels 0 1 / 2 3: steps across the row seam 2, 2 and across the column seam 1, 1 ->
    # mean 1.5; spread on normal pixels: q99 = 3, median of the four equal quarters = 1.5 -> 1.0;
    # lines midway between seams lie inside a quadrant: no step (the control is 0), so 1.0 - 0
    maps = torch.zeros(1, 512, 512)
    maps[:, :256, 256:], maps[:, 256:, :256], maps[:, 256:, 256:] = 1.0, 2.0, 3.0
    contrast, control = block_contrast(maps, ENS4)
    assert contrast == pytest.approx(1.0) and control == 0.0
    assert block_contrast(maps * 7 + 4, ENS4) == pytest.approx((1.0, 0.0))  # a ratio: the map's unit cancels


def test_blocks_are_no_ridge_and_a_ridge_is_no_block():
    # quadrant levels: the band on the seam holds both sides in equal parts, as the midway bands
    # hold the quadrants: no ridge
    maps = torch.zeros(1, 512, 512)
    maps[:, :256, 256:], maps[:, 256:, :256], maps[:, 256:, 256:] = 1.0, 2.0, 3.0
    assert seam_ridge(maps, ENS4) == pytest.approx(0.0, abs=1e-6)
    # lines of 1 on a map of 0, rows and columns 252-259 (8 px on the seam at 256): 3 % of the pixels,
    # so q99 = 1, median 0, spread 1. The seam band (a quarter cell, 64 px, each side: rows 192-319)
    # holds the 8 ridge rows across 512 columns plus the 8 ridge columns on its other 120 rows;
    # a midway band (rows 64-191) only the 8 columns: (8*512 + 120*8) / (128*512) - 8/512 = 0.0615234375
    ridge = torch.zeros(1, 512, 512)
    ridge[:, 252:260, :], ridge[:, :, 252:260] = 1.0, 1.0
    assert seam_ridge(ridge, ENS4) == pytest.approx(0.0615234375)
    assert seam_ridge(ridge * 7 + 4, ENS4) == pytest.approx(0.0615234375)  # a ratio: the map's unit cancels
    # linear: the mean map of several images with their common spread gives the same value
    several = torch.cat([ridge, ridge.flip(-1), ridge * 0.5])
    assert seam_ridge(several.mean(0, keepdim=True), ENS4, map_spread(several)) == pytest.approx(seam_ridge(several, ENS4), rel=1e-5)  # float32 sums
    # ... which the step across the seam does not see: equal on both sides
    assert block_contrast(ridge, ENS4) == pytest.approx((0.0, 0.0))


def test_windows_hide_raised_tile_borders_that_the_flat_mean_shows_as_lines():
    """Every slot scores the outer 8 px of its tile 1 higher than the rest (a receptive field that saw
    padding), and nothing else: the flat mean draws the grid as lines along the seams. Within 8 px
    of its border a tile's tukey weight is at most sin^2(pi/2 * 8/32) = 0.146, so where another tile
    covers that ring at full weight the ring counts at most 0.146 / 1.146 of its height: the ridge
    drops below a fifth; hann's weight there is smaller still."""
    ring = torch.ones(256, 256, dtype=torch.bool)
    ring[8:-8, 8:-8] = False
    raised = [ring[None].float() for _ in range(ENS9.num_tiles)]
    flat, tukey, hann = (seam_ridge(merge(ENS9, raised, tile_window((256, 256), w)), ENS9, spread=1.0)
                         for w in ("flat", "tukey", "hann"))
    assert flat > 0.05 and abs(tukey) < flat / 5 and abs(hann) < abs(tukey)


def test_no_seam_or_no_normal_image_has_no_block_contrast():
    assert block_contrast(torch.rand(2, 64, 64), TileGrid.create(64, 64, 64)) == (None, None)
    assert block_contrast(torch.zeros(0, 512, 512), ENS4) == (None, None)
    assert seam_ridge(torch.rand(2, 64, 64), TileGrid.create(64, 64, 64)) is None
    assert seam_ridge(torch.zeros(0, 512, 512), ENS4) is None


@pytest.mark.parametrize("grid", [ENS4, ENS9], ids=["ens4", "ens9"])
def test_calibrated_slots_merge_without_blocks(grid):
    """Slots on four scales make the merged map show its tiles; calibrated on other normal images,
    the block contrast falls to the level of the off-seam control."""
    slots = grid.num_tiles
    gain, offset = GAIN.repeat(3)[:slots], OFFSET.repeat(3)[:slots]
    val = grid.tile(normal_fields(4, seed=2)[:, None])[:, :, 0]
    test = grid.tile(normal_fields(3, seed=3)[:, None])[:, :, 0]
    raw, calibrated = [], []
    for k in range(slots):
        normal = gain[k] * val[:, k] + offset[k]
        stats = fit_calibration(normal, normal.amax(dim=(-2, -1)))
        maps = gain[k] * test[:, k] + offset[k]
        raw.append(maps)
        calibrated.append(stats.apply(maps, maps.amax(dim=(-2, -1)), "slot")[0])
    raw_contrast, raw_control = block_contrast(merge(grid, raw), grid)
    contrast, control = block_contrast(merge(grid, calibrated), grid)
    assert raw_contrast > 0.3 and raw_contrast > 3 * raw_control
    assert abs(contrast) < 0.05  # the seams step no more than any other line, within the estimates' noise


def test_window_weights_are_positive_and_cancel_where_one_tile_covers():
    for kind in ("hann", "cosine", "tukey"):
        window = tile_window((256, 384), kind)
        assert window.shape == (256, 384) and bool((window > 0).all()) and float(window.max()) <= 1.0
        assert torch.equal(window, window.flip(0)) and torch.equal(window, window.flip(1))
    tukey = tile_window((256, 384), "tukey")  # flat inside; rises over the outer 1/8 (32 and 48 px)
    assert bool((tukey[32:-32, 48:-48] == 1).all()) and float(tukey[0, 0]) < 0.01 and float(tukey[31, 200]) < 1
    assert tile_window((256, 256), "flat") is None
    # a weighted mean of equal values is that value: tiles that agree merge to what they agree on
    for grid in (ENS4, ENS9):
        merged = merge(grid, [torch.full((1, 256, 256), 2.5)] * grid.num_tiles, tile_window(grid.tile_size, "hann"))
        torch.testing.assert_close(merged, torch.full((1, 512, 512), 2.5))
    # ENS4: one tile per pixel, so Hann weighting changes nothing at all
    tiles = [normal_fields(1, seed=5 + k, size=256) for k in range(4)]
    torch.testing.assert_close(merge(ENS4, tiles, tile_window((256, 256), "hann")), merge(ENS4, tiles), atol=1e-5, rtol=1e-5)
