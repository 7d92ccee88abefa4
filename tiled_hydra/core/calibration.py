"""Slots on one scale: per-slot calibration of tile maps and scores, and window blending of overlaps.

Each slot of a tiled ensemble is fitted on its own tile location, so its anomaly map lives on its
own scale: one slot's normal background may sit well above another's. Merging raw maps (paper 000
merges, then normalises once) then lets the slot with the highest baseline decide, and the merged
map shows the tiles as blocks. Calibration maps every slot's outputs onto one common scale before
merging, with statistics of that slot's own outputs on normal images that are never test images
(the validation split's normal images; the training images when there is no validation split):

``slot``
    ``(x - median) / (quantile - median)`` of all the slot's map values on those tiles, and the same
    for its tile scores: 0 is a typical normal value, 1 the high end of normal (``quantile``, 0.99).
``slot_position``
    the same per pixel position within the tile (median and quantile over the calibration tiles at
    that position, lightly smoothed), which also removes a slot's border pattern; it needs enough
    calibration tiles (``MIN_POSITION_TILES``), else the slot-wide statistics are used.

Window blending weights each tile's map by a smooth window before the overlaps are averaged, so a
tile's border, where its receptive field saw zero padding or the tile's edge, counts less than its
centre; where only one tile covers a pixel the window cancels out exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tiled_hydra.core.filters import gaussian_blur

CALIBRATIONS = ("none", "slot", "slot_position")
WINDOWS = ("flat", "hann", "cosine", "tukey")
#: Share of the tile length, on each side, over which the ``tukey`` window rises from 0 to 1.
TUKEY_TAPER = 1 / 8
#: Calibration tiles a slot needs before its per-position statistics are used (fewer: slot-wide).
MIN_POSITION_TILES = 8
#: Smallest spread a statistic may have (a constant map would divide by zero).
_EPS = 1e-12


def _spread(high: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
    return (high - median).clamp_min(_EPS)


@dataclass
class SlotCalibration:
    """What one slot's outputs look like on normal images: medians and robust spreads."""

    map_median: float
    map_spread: float
    score_median: float
    score_spread: float
    tiles: int  # calibration tiles the statistics come from
    position_median: torch.Tensor | None = None  # (th, tw); None: too few tiles
    position_spread: torch.Tensor | None = None

    def apply(self, maps: torch.Tensor, scores: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile maps (B, th, tw) and scores (B,) on the common scale of ``mode``."""
        if mode == "none":
            return maps, scores
        scores = (scores - self.score_median) / self.score_spread
        if mode == "slot_position" and self.position_median is not None:
            median, spread = self.position_median.to(maps), self.position_spread.to(maps)
            return (maps - median) / spread, scores
        return (maps - self.map_median) / self.map_spread, scores

    def state(self) -> dict:
        """Tensors and numbers for a checkpoint (``torch.load(weights_only=True)`` reads them back)."""
        out = {"map_median": self.map_median, "map_spread": self.map_spread, "score_median": self.score_median,
               "score_spread": self.score_spread, "tiles": self.tiles}
        if self.position_median is not None:
            out |= {"position_median": self.position_median, "position_spread": self.position_spread}
        return out

    def summary(self) -> dict:
        """The numbers only, for the slot's JSON record."""
        return {k: round(float(v), 6) if isinstance(v, float) else v for k, v in self.state().items() if not torch.is_tensor(v)}

    @classmethod
    def from_state(cls, state: dict) -> "SlotCalibration":
        return cls(float(state["map_median"]), float(state["map_spread"]), float(state["score_median"]),
                   float(state["score_spread"]), int(state["tiles"]), state.get("position_median"), state.get("position_spread"))


def fit_calibration(maps: torch.Tensor, scores: torch.Tensor, quantile: float = 0.99) -> SlotCalibration:
    """Statistics of a slot's tile maps (N, th, tw) and tile scores (N,) on normal calibration tiles."""
    if len(maps) == 0:
        raise ValueError("calibration needs at least one normal tile")
    maps, scores = maps.float(), scores.float().reshape(-1)
    values = maps.reshape(-1)
    if values.numel() > 2**24:  # torch.quantile's input limit; an even subsample keeps the statistics
        values = values[:: math.ceil(values.numel() / 2**24)]
    map_median, map_high = torch.quantile(values, torch.tensor([0.5, quantile]))
    score_median, score_high = torch.quantile(scores, torch.tensor([0.5, quantile]))
    position_median = position_spread = None
    if len(maps) >= MIN_POSITION_TILES:
        median, high = torch.quantile(maps, torch.tensor([0.5, quantile]), dim=0)
        # a light blur: per-position statistics of a few tiles are noisy pixel to pixel
        sigma = max(1.0, min(maps.shape[-2:]) / 64)
        median, high = gaussian_blur(torch.stack([median, high]), sigma)
        position_median, position_spread = median, _spread(high, median)
    return SlotCalibration(float(map_median), float(_spread(map_high, map_median)), float(score_median),
                           float(_spread(score_high, score_median)), len(maps), position_median, position_spread)


def tile_window(tile_size: tuple[int, int], kind: str) -> torch.Tensor | None:
    """Weights (th, tw) of one tile's map when overlaps are blended; None for the flat mean.

    Evaluated at pixel centres, so no weight is 0: ``hann`` = sin^2(pi (i + 1/2) / n) per axis,
    ``cosine`` = sin(pi (i + 1/2) / n) (flatter in the middle, steeper at the edge than Hann),
    ``tukey`` = 1 except within ``TUKEY_TAPER`` of the tile's length from its edge, where it rises as
    sin^2 (the border, where the receptive field saw padding, counts less; the interior of an overlap
    keeps the plain mean of the paper).
    """
    if kind == "flat":
        return None
    axes = []
    for n in tile_size:
        centres = torch.arange(n, dtype=torch.float64) + 0.5
        if kind == "tukey":
            taper = max(1.0, n * TUKEY_TAPER)
            edge = torch.minimum(centres, n - centres).clamp(max=taper)  # distance to the nearer edge
            axes.append(torch.sin(math.pi / 2 * edge / taper).square())
            continue
        profile = torch.sin(math.pi * centres / n)
        axes.append(profile.square() if kind == "hann" else profile)
    return (axes[0][:, None] * axes[1][None, :]).float()
