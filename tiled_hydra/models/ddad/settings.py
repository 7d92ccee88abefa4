"""DDAD's settings that the configuration check reads without torch: the U-Net's channel plan
(how often it halves a tile, so which tile and crop sizes it takes) and the shape of ``sizes``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, TypedDict

from tiled_hydra.config import Count, Range
from tiled_hydra.errors import ConfigError

BOTTOM = 8  # px of the U-Net's lowest level (the reference's at every image size)


class UNetSize(TypedDict):
    """One entry of ``model.net.sizes``."""

    width: Count  # channels of the top level
    heads: Count  # attention heads at every attention level
    dropout: Annotated[float, Range(0, 1, high_open=True)]


@dataclass(frozen=True)
class ChannelPlan:
    widths: tuple[int, ...]      # channels per level, top (full resolution) first
    attention: tuple[bool, ...]  # attention blocks at that level
    downsampling: int            # total downsampling factor: tile sides must be multiples of it

    @property
    def groups(self) -> int:
        """GroupNorm groups: 32 as guided diffusion, fewer when a level is narrower."""
        return math.gcd(32, *self.widths)


def pair(size) -> tuple[int, int]:
    values = [size, size] if isinstance(size, int) else [int(v) for v in size]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def levels(tile_size: tuple[int, int], bottom: int = BOTTOM) -> int:
    """U-Net levels of a tile: its shorter side halved down to ``bottom`` px."""
    return int(math.floor(math.log2(min(tile_size) / bottom))) + 1


def tile_problem(tile_size, settings: dict | None = None) -> str | None:
    """What a tile size needs and lacks for the U-Net (None: it fits)."""
    tile = pair(tile_size)
    if min(tile) < BOTTOM:
        return f"tiles of at least {BOTTOM} px for DDAD's U-Net (setup.tile_size)"
    factor = 2 ** (levels(tile) - 1)
    if any(s % factor for s in tile):
        side = min(tile)
        return (f"tile sides that are multiples of {factor}: DDAD's U-Net halves a {side} px tile {levels(tile) - 1} "
                f"times (setup.tile_size, e.g. {side // factor * factor} or {(side // factor + 1) * factor})")
    return None


def crop_problem(train_crop, settings: dict) -> str | None:
    """The random training crop must halve as often as its tile does."""
    if settings.get("tile_size") is None or tile_problem(settings["tile_size"]) is not None:
        return None  # the tile's own message comes first
    tile = pair(settings["tile_size"])
    factor = 2 ** (levels(tile) - 1)
    if any(min(int(train_crop), side) % factor for side in tile):
        return f"null or a multiple of {factor}, the U-Net's downsampling for {tile[0]}x{tile[1]} px tiles"
    return None


def channel_plan(tile_size: tuple[int, int], width: int, halving_period: int, min_channels: int,
                 attention_resolution: int, bottom: int = BOTTOM) -> ChannelPlan:
    """U-Net levels for a (height, width) tile; refuses sizes its downsampling cannot halve exactly."""
    if (problem := tile_problem(tile_size)) is not None:
        raise ConfigError(f"setup.tile_size={list(tile_size)}: expected {problem}")
    side, count = min(tile_size), levels(tile_size, bottom)
    widths, attention = [], []
    for level in range(count):
        from_bottom = count - 1 - level
        multiplier = 4 / 2 ** (from_bottom // halving_period)
        widths.append(max(min_channels, int(width * multiplier)))
        attention.append(side // 2**level <= attention_resolution)
    return ChannelPlan(tuple(widths), tuple(attention), 2 ** (count - 1))
