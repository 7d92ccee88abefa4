"""How much a merged map shows its tiles: the block contrast across tile seams on normal images.

The seams of the tile grid (every tile border inside the image) cut the image into cells. On a
normal image a map without tile artefacts has about the same level in neighbouring cells; a map
whose slots live on different scales jumps at the seams. Block contrast = the mean absolute
difference between the mean map values of adjacent cells, over every pair of neighbouring cells of
every normal image, divided by the map's spread on normal pixels (99th percentile - median over
all normal pixels). 0: no step at any seam; 1: the cells differ by the whole high end of normal.
"""

from __future__ import annotations

import math

import torch

from tiled_hydra.core.tiling import TileGrid

#: Pixels sampled at most for the spread's quantiles (torch.quantile's input limit is 2^24).
_SAMPLE = 2**22


def cell_means(maps: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(N, H, W) maps -> (N, R, C) mean of each cell between the grid's seams."""
    row_seams, col_seams = grid.seams()
    rows = [0, *row_seams, maps.shape[-2]]
    cols = [0, *col_seams, maps.shape[-1]]
    return torch.stack([torch.stack([maps[:, r0:r1, c0:c1].mean(dim=(-2, -1)) for c0, c1 in zip(cols, cols[1:])], dim=-1)
                        for r0, r1 in zip(rows, rows[1:])], dim=-2)


def block_contrast(maps: torch.Tensor, grid: TileGrid) -> float | None:
    """Block contrast (module doc) of merged maps (N, H, W) of normal images; None when the grid has
    no seam (a single tile) or there is no normal image."""
    row_seams, col_seams = grid.seams()
    if len(maps) == 0 or not (row_seams or col_seams):
        return None
    maps = maps.float()
    means = cell_means(maps, grid)
    steps = [(means[:, :, 1:] - means[:, :, :-1]).abs().flatten(), (means[:, 1:, :] - means[:, :-1, :]).abs().flatten()]
    step = torch.cat(steps).mean()
    values = maps.flatten()
    values = values[:: math.ceil(values.numel() / _SAMPLE)]
    median, high = torch.quantile(values, torch.tensor([0.5, 0.99]))
    spread = float(high - median)
    return float(step) / spread if spread > 0 else 0.0
