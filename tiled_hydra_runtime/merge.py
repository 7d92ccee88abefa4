"""Tiling and merging in numpy, step for step as the inference engine does it
(tiled_hydra.core.tiling, core.calibration, core.merge and inference.engine):

tiles cut from the image zero-padded at the bottom/right; each slot's tile maps and scores put on
a common scale (``calibration``), weighted by the tile window and added into a float32 buffer in
slot order; the buffer divided by the coverage (the sum of the covering windows); the seam band
Gaussian-smoothed; the image score the mean or max of the tile scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tiled_hydra_runtime.filters import F32, gaussian_blur


@dataclass(frozen=True)
class Grid:
    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    stride: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(math.ceil((h - t) / s) + 1 for h, t, s in zip(self.image_size, self.tile_size, self.stride))

    @property
    def num_tiles(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def padded_size(self) -> tuple[int, int]:
        return tuple((n - 1) * s + t for n, s, t in zip(self.shape, self.stride, self.tile_size))

    def origin(self, index: int) -> tuple[int, int]:
        i, j = divmod(index, self.shape[1])
        return self.stride[0] * i, self.stride[1] * j

    def seams(self) -> tuple[list[int], list[int]]:
        out = []
        for axis in range(2):
            n, s, t, size = self.shape[axis], self.stride[axis], self.tile_size[axis], self.image_size[axis]
            edges = {s * k for k in range(1, n)} | {s * k + t for k in range(n - 1)}
            out.append(sorted(e for e in edges if 0 < e < size))
        return out[0], out[1]

    def pad(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> zero-padded to the padded size (N, C, Hp, Wp)."""
        (h, w), (ph, pw) = self.image_size, self.padded_size
        return np.pad(images, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)))

    def tiles(self, padded: np.ndarray, indices: list[int]) -> np.ndarray:
        """Tiles ``indices`` of padded uint8 images as float32 in [0, 1], image-major (N * len, C, th, tw)."""
        th, tw = self.tile_size
        out = np.stack([padded[:, :, r : r + th, c : c + tw] for r, c in map(self.origin, indices)], axis=1)
        return out.reshape(-1, *out.shape[2:]).astype(F32) / F32(255)

    def add_tile(self, target: np.ndarray, tile_maps: np.ndarray, index: int) -> None:
        """Add maps (N, th, tw) of tile ``index`` into the sum buffer (N, H, W), in place."""
        (r, c), (h, w) = self.origin(index), self.image_size
        rh, rw = min(r + self.tile_size[0], h) - r, min(c + self.tile_size[1], w) - c
        target[:, r : r + rh, c : c + rw] += tile_maps[:, :rh, :rw]

    def coverage(self, window: np.ndarray | None) -> np.ndarray:
        weights = np.ones(self.tile_size, dtype=F32) if window is None else window
        out = np.zeros((1, *self.image_size), dtype=F32)
        for index in range(self.num_tiles):
            self.add_tile(out, weights[None], index)
        return out[0]


def tile_window(tile_size: tuple[int, int], kind: str) -> np.ndarray | None:
    """Weights (th, tw) of a tile's map in the overlap blend, evaluated at pixel centres; None: flat."""
    if kind == "flat":
        return None
    axes = []
    for n in tile_size:
        centres = np.arange(n, dtype=np.float64) + 0.5
        if kind == "tukey":  # 1 inside, sin^2 rise over 1/8 of the tile from each edge
            taper = max(1.0, n / 8)
            edge = np.minimum(np.minimum(centres, n - centres), taper)
            axes.append(np.sin(math.pi / 2 * edge / taper) ** 2)
            continue
        profile = np.sin(math.pi * centres / n)
        axes.append(profile**2 if kind == "hann" else profile)
    return (axes[0][:, None] * axes[1][None, :]).astype(F32)


def seam_band_mask(grid: Grid, width_fraction: float) -> np.ndarray:
    """Bool (H, W): within ``round(width_fraction * tile)`` pixels on each side of a seam."""
    height, width = grid.image_size
    row_seams, col_seams = grid.seams()
    band_h, band_w = round(width_fraction * grid.tile_size[0]), round(width_fraction * grid.tile_size[1])
    in_rows, in_cols = np.zeros(height, dtype=bool), np.zeros(width, dtype=bool)
    for p in row_seams:
        in_rows[max(p - band_h, 0) : p + band_h] = True
    for p in col_seams:
        in_cols[max(p - band_w, 0) : p + band_w] = True
    return in_rows[:, None] | in_cols[None, :]


@dataclass(frozen=True)
class Calibration:
    """One slot's statistics on normal images (tiled_hydra.core.calibration.SlotCalibration)."""

    map_median: float
    map_spread: float
    score_median: float
    score_spread: float
    position_median: np.ndarray | None = None
    position_spread: np.ndarray | None = None

    def apply(self, maps: np.ndarray, scores: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
        if mode == "none":
            return maps, scores
        scores = (scores - F32(self.score_median)) / F32(self.score_spread)
        if mode == "slot_position" and self.position_median is not None:
            return (maps - self.position_median) / self.position_spread, scores
        return (maps - F32(self.map_median)) / F32(self.map_spread), scores


@dataclass(frozen=True)
class MergeRule:
    score: str  # mean | max
    seam_smoothing: bool
    sigma: float
    width_fraction: float
    calibration: str  # none | slot | slot_position
    window: str  # flat | hann | cosine | tukey


class Merger:
    """Sum buffers of a batch of images; slots add their tile outputs, then :meth:`result`."""

    def __init__(self, grid: Grid, rule: MergeRule):
        self.grid, self.rule = grid, rule
        self.window = tile_window(grid.tile_size, rule.window)
        self.coverage = grid.coverage(self.window)
        self.band = seam_band_mask(grid, rule.width_fraction) if rule.seam_smoothing else None

    def start(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((count, *self.grid.image_size), dtype=F32), np.zeros((count, self.grid.num_tiles), dtype=F32)

    def add(self, map_sum: np.ndarray, tile_scores: np.ndarray, tiles: list[int], maps: np.ndarray, scores: np.ndarray,
            calibration: Calibration | None) -> None:
        """A slot's tile maps (N * len(tiles), th, tw) and scores (N * len(tiles),), image-major."""
        maps, scores = maps.astype(F32, copy=False), scores.astype(F32, copy=False)
        if self.rule.calibration != "none":
            maps, scores = calibration.apply(maps, scores, self.rule.calibration)
        maps = maps.reshape(-1, len(tiles), *maps.shape[-2:])
        scores = scores.reshape(-1, len(tiles))
        for k, tile in enumerate(tiles):
            self.grid.add_tile(map_sum, maps[:, k] if self.window is None else maps[:, k] * self.window, tile)
            tile_scores[:, tile] = scores[:, k]

    def result(self, map_sum: np.ndarray, tile_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = map_sum / self.coverage
        if self.band is not None and self.rule.sigma > 0 and self.band.any():
            maps = np.where(self.band, gaussian_blur(maps, self.rule.sigma), maps)
        if self.rule.score == "mean":
            return maps, tile_scores.mean(axis=1, dtype=F32)
        return maps, tile_scores.max(axis=1)
