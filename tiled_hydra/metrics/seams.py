"""How much a merged map shows its tiles: the block contrast across tile seams on normal images.

The seams of the tile grid (every tile border inside the image) cut the image into cells. A map
whose slots live on different scales jumps at the seams; a map without tile artefacts is about as
smooth across a seam as anywhere else. The step across a line: for every segment of the line
between two perpendicular cuts, the mean of a narrow band on each side (``band`` = 1/8 of the
smaller cell extent) and their absolute difference, averaged over all segments of all normal
images and divided by the map's spread on normal pixels (99th percentile - median over all normal
pixels). Narrow bands keep the slow variation of the map across the image out of the step.

A map steps along any line a little (texture, noise), so the same step measured on lines midway
between the seams is the control (``off_seam``), and block contrast is what the seams add to it:
step across the seams - step off the seams. 0: the seams do not show (within the noise of the
two estimates, which can make it slightly negative); 1: the map jumps at the seams by the whole
high end of normal.

A step misses lines: a map raised (or lowered) along the seams on both sides alike, as where
every tile's border scores high, steps up and down again and shows the grid as lines, and a
window that only narrows such a line can leave two beside the seam. The seam ridge is the mean of
the map within a quarter cell of the seams minus its mean within a quarter cell of the lines
midway between them (the two halves of every inner cell), divided by the same spread: 0, nothing
locked to the seams; positive, brighter near the seams. Steps between cells cancel in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tiled_hydra.core.tiling import TileGrid

#: Pixels sampled at most for the spread's quantiles (torch.quantile's input limit is 2^24).
_SAMPLE = 2**22
#: Band width as a fraction of the smaller cell extent.
BAND_FRACTION = 1 / 8


def _cuts(seams: list[int], size: int) -> list[int]:
    return [0, *seams, size]


def line_steps(maps: torch.Tensor, row_lines: list[int], col_lines: list[int], row_cuts: list[int],
               col_cuts: list[int], band: int) -> torch.Tensor:
    """Absolute steps (flattened) across horizontal lines at ``row_lines`` and vertical lines at
    ``col_lines``: band means on each side, per segment between consecutive perpendicular cuts."""
    steps = []
    for y in row_lines:
        for c0, c1 in zip(col_cuts, col_cuts[1:]):
            above, below = maps[:, y - band:y, c0:c1], maps[:, y:y + band, c0:c1]
            steps.append((above.mean(dim=(-2, -1)) - below.mean(dim=(-2, -1))).abs())
    for x in col_lines:
        for r0, r1 in zip(row_cuts, row_cuts[1:]):
            left, right = maps[:, r0:r1, x - band:x], maps[:, r0:r1, x:x + band]
            steps.append((left.mean(dim=(-2, -1)) - right.mean(dim=(-2, -1))).abs())
    return torch.cat(steps) if steps else torch.zeros(0)


def map_spread(maps: torch.Tensor) -> float:
    """The maps' spread on normal pixels: 99th percentile - median of all their pixels."""
    values = maps.float().flatten()
    values = values[:: math.ceil(values.numel() / _SAMPLE)]
    median, high = torch.quantile(values, torch.tensor([0.5, 0.99]))
    return float(high - median)


@dataclass(frozen=True)
class GridLines:
    """Seams, the cell cuts they make (image edges included), the midway lines of the cells on an
    axis that has seams (the control), and the smallest cell extent."""

    row_seams: list[int]
    col_seams: list[int]
    row_cuts: list[int]
    col_cuts: list[int]
    row_mid: list[int]
    col_mid: list[int]
    smallest_cell: int


def grid_lines(grid: TileGrid, height: int, width: int) -> GridLines | None:
    """The lines of ``grid`` on maps of (height, width); None for a single tile (no seam)."""
    row_seams, col_seams = grid.seams()
    if not (row_seams or col_seams):
        return None
    row_cuts, col_cuts = _cuts(row_seams, height), _cuts(col_seams, width)
    extents = [b - a for cuts in (row_cuts, col_cuts) for a, b in zip(cuts, cuts[1:])]
    row_mid = [(a + b) // 2 for a, b in zip(row_cuts, row_cuts[1:])] if row_seams else []
    col_mid = [(a + b) // 2 for a, b in zip(col_cuts, col_cuts[1:])] if col_seams else []
    return GridLines(row_seams, col_seams, row_cuts, col_cuts, row_mid, col_mid, min(extents))


def block_contrast(maps: torch.Tensor, grid: TileGrid, spread: float | None = None) -> tuple[float | None, float | None]:
    """(block contrast, off-seam step) of merged maps (N, H, W) of normal images (module doc);
    (None, None) when the grid has no seam (a single tile) or there is no normal image. ``spread``:
    :func:`map_spread` of the maps, when the caller has it already."""
    lines = grid_lines(grid, *maps.shape[-2:])
    if len(maps) == 0 or lines is None:
        return None, None
    maps = maps.float()
    band = max(1, int(lines.smallest_cell * BAND_FRACTION))
    spread = map_spread(maps) if spread is None else spread
    if spread <= 0:
        return 0.0, 0.0
    on = line_steps(maps, lines.row_seams, lines.col_seams, lines.row_cuts, lines.col_cuts, band).mean()
    off = line_steps(maps, lines.row_mid, lines.col_mid, lines.row_cuts, lines.col_cuts, band).mean()
    return float(on - off) / spread, float(off) / spread


def band_means(maps: torch.Tensor, row_lines: list[int], col_lines: list[int], half: int) -> torch.Tensor:
    """Mean of the map (per image) in the band of ``2 * half`` pixels centred on each line: (N, lines)."""
    means = [maps[:, max(y - half, 0):y + half, :].mean(dim=(-2, -1)) for y in row_lines]
    means += [maps[:, :, max(x - half, 0):x + half].mean(dim=(-2, -1)) for x in col_lines]
    return torch.stack(means, dim=1)


def seam_ridge(maps: torch.Tensor, grid: TileGrid, spread: float | None = None) -> float | None:
    """Seam ridge of merged maps (N, H, W) of normal images (module doc); None when the grid has no
    seam or there is no normal image. Linear in the maps: the mean map of the images gives the same
    value when ``spread`` (of all their pixels, :func:`map_spread`) is passed."""
    lines = grid_lines(grid, *maps.shape[-2:])
    if len(maps) == 0 or lines is None:
        return None
    maps = maps.float()
    half = max(1, lines.smallest_cell // 4)  # a quarter cell on each side: the two halves of a cell
    spread = map_spread(maps) if spread is None else spread
    if spread <= 0:
        return 0.0
    on = band_means(maps, lines.row_seams, lines.col_seams, half).mean()
    off = band_means(maps, lines.row_mid, lines.col_mid, half).mean()
    return float(on - off) / spread


def tile_artefacts(normal_maps: torch.Tensor, grid: TileGrid) -> dict:
    """results.json's block_contrast, block_contrast_off_seam and seam_ridge of the merged maps of
    the normal test images (the spread computed once)."""
    spread = map_spread(normal_maps) if len(normal_maps) else None
    contrast, off_seam = block_contrast(normal_maps, grid, spread)
    return {"block_contrast": contrast, "block_contrast_off_seam": off_seam,
            "seam_ridge": seam_ridge(normal_maps, grid, spread)}
