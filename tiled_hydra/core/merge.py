"""Merging tile predictions into full-image predictions (paper 000, §3.3).

Untiling the maps (overlaps averaged) is :meth:`TileGrid.untile` / :meth:`TileGrid.add_tile`;
this module merges the image-level outputs and smooths the seams the tile borders leave
in the merged map. Argument names follow the keys of ``conf/merge/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiled_hydra.core.filters import gaussian_blur
from tiled_hydra.core.tiling import TileGrid

# Images blurred at once by smooth_seams: bounds the blur's temporaries to a few maps.
_SMOOTHING_CHUNK = 16


@dataclass(frozen=True)
class MergeSettings:
    """``merge.*`` of the config."""

    score: str = "mean"  # image score from tile scores: mean (Eq. 5) | max
    seam_smoothing: bool = True
    sigma: float = 2.0
    width_fraction: float = 0.1
    calibration: str = "none"  # none | slot | slot_position (core/calibration.py)
    window: str = "flat"  # flat (the paper's pixel-wise mean) | hann | cosine | tukey


def merge_scores(tile_scores: torch.Tensor, score: str = "mean") -> torch.Tensor:
    """(N, T) tile scores -> (N,) image scores: ``mean`` (Eq. 5, the paper's default) or ``max``."""
    if score == "mean":
        return tile_scores.mean(dim=1)
    if score == "max":
        return tile_scores.amax(dim=1)
    raise ValueError(f"merge score must be 'mean' or 'max', got {score!r}")


def seam_band_width(tile_length: int, width_fraction: float) -> int:
    """Pixels on EACH side of a seam: width_fraction x tile length, rounded (0.1 x 256 -> 26)."""
    return round(width_fraction * tile_length)


def seam_band_mask(grid: TileGrid, width_fraction: float = 0.1) -> torch.Tensor:
    """Bool (H, W), True within ``width_fraction`` x tile size on each side of every seam.

    A seam at position ``p`` lies between pixels ``p - 1`` and ``p``; its band is
    ``[p - b, p + b)``. Column seams use the tile width, row seams the tile height, and
    each band runs across the whole image.
    """
    height, width = grid.image_size
    row_seams, col_seams = grid.seams()
    band_h = seam_band_width(grid.tile_size[0], width_fraction)
    band_w = seam_band_width(grid.tile_size[1], width_fraction)
    in_rows = torch.zeros(height, dtype=torch.bool)
    in_cols = torch.zeros(width, dtype=torch.bool)
    for p in row_seams:
        in_rows[max(p - band_h, 0) : p + band_h] = True
    for p in col_seams:
        in_cols[max(p - band_w, 0) : p + band_w] = True
    return in_rows[:, None] | in_cols[None, :]


def smooth_seams(maps: torch.Tensor, grid: TileGrid, sigma: float = 2.0, width_fraction: float = 0.1) -> torch.Tensor:
    """Gaussian-blur (N, H, W) maps inside the seam band only; outside it pixels are returned bit for bit.

    The blur sees the whole map (reflect padding at the image border, kernel 2*ceil(3*sigma)+1),
    so band pixels near the band edge are smoothed with their true neighbours. A grid
    without seams (1x1) returns ``maps`` itself.
    """
    band = seam_band_mask(grid, width_fraction).to(maps.device)
    if sigma <= 0 or not bool(band.any()):
        return maps
    smoothed = torch.empty_like(maps)
    for start in range(0, maps.shape[0], _SMOOTHING_CHUNK):
        chunk = maps[start : start + _SMOOTHING_CHUNK]
        smoothed[start : start + _SMOOTHING_CHUNK] = torch.where(band, gaussian_blur(chunk, sigma), chunk)
    return smoothed
