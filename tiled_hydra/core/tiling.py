"""Tiling of images into a regular grid (paper 000, Eq. 1-2) and its exact inverse.

A tile grid covers an ``h x w`` image with ``tile`` sized windows every ``stride``
pixels.  When the grid does not end exactly on the border, the image is padded
with zeros at the bottom/right; untiling removes that padding again.  Overlapping
pixels are averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange


def as_pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A side length or [height, width] (a one-element list is a square) as (height, width)."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    values = [int(v) for v in value]
    if len(values) == 1:
        return values[0], values[0]
    h, w = values
    return h, w


@dataclass(frozen=True)
class TileGrid:
    """Geometry of one tiling plan: image size, tile size and stride (height, width)."""

    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    stride: tuple[int, int]

    @classmethod
    def create(cls, image_size, tile_size, stride) -> "TileGrid":
        grid = cls(as_pair(image_size), as_pair(tile_size), as_pair(stride))
        grid.validate()
        return grid

    def validate(self) -> None:
        for axis, h, t, s in zip(("height", "width"), self.image_size, self.tile_size, self.stride):
            if min(h, t, s) <= 0:
                raise ValueError(f"image, tile and stride {axis} must be positive, got {h}, {t}, {s}")
            if t > h:
                raise ValueError(f"tile {axis} {t} is larger than the image {axis} {h}")
            if s > t:
                raise ValueError(f"stride {axis} {s} is larger than the tile {axis} {t}: pixels would be skipped")

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tile rows and columns (nh, nw); the last ones may reach into zero padding."""
        return tuple(math.ceil((h - t) / s) + 1 for h, t, s in zip(self.image_size, self.tile_size, self.stride))

    @property
    def num_tiles(self) -> int:
        nh, nw = self.shape
        return nh * nw

    @property
    def padded_size(self) -> tuple[int, int]:
        return tuple((n - 1) * s + t for n, s, t in zip(self.shape, self.stride, self.tile_size))

    def location(self, index: int) -> tuple[int, int]:
        """Row-major tile index -> (i, j) grid location."""
        return divmod(index, self.shape[1])

    def window(self, index: int) -> tuple[slice, slice]:
        """Pixels of the (padded) image that tile ``index`` covers (Eq. 2)."""
        i, j = self.location(index)
        (th, tw), (sh, sw) = self.tile_size, self.stride
        return slice(sh * i, sh * i + th), slice(sw * j, sw * j + tw)

    def seams(self) -> tuple[list[int], list[int]]:
        """Row and column positions (inside the image) where a tile border lies."""
        out = []
        for axis in range(2):
            n, s, t, size = self.shape[axis], self.stride[axis], self.tile_size[axis], self.image_size[axis]
            edges = {s * k for k in range(1, n)} | {s * k + t for k in range(n - 1)}
            out.append(sorted(e for e in edges if 0 < e < size))
        return out[0], out[1]

    def coverage(self, window: torch.Tensor | None = None) -> torch.Tensor:
        """How many tiles cover each pixel of the image (h, w); with a ``window`` (th, tw) the sum of
        the covering tiles' weights (the divisor of a window-weighted average)."""
        weights = torch.ones(*self.tile_size) if window is None else window
        return self.untile_sum(weights.expand(1, self.num_tiles, 1, *self.tile_size))[0, 0]

    # -- tensors -----------------------------------------------------------------
    def tile(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C, th, tw), tiles in row-major grid order."""
        b, c, h, w = images.shape
        if (h, w) != self.image_size:
            raise ValueError(f"expected images of size {self.image_size}, got {(h, w)}")
        ph, pw = self.padded_size
        padded = F.pad(images, (0, pw - w, 0, ph - h))
        cols = F.unfold(padded.float() if not padded.is_floating_point() else padded, self.tile_size, stride=self.stride)
        tiles = rearrange(cols, "b (c th tw) n -> b n c th tw", c=c, th=self.tile_size[0], tw=self.tile_size[1])
        return tiles.to(images.dtype)

    def tile_subset(self, images: torch.Tensor, tiles: list[int]) -> torch.Tensor:
        """(B, C, H, W) -> (B, len(tiles), C, th, tw): only the requested tiles, cut without
        materialising the others (a slot of an ensemble needs one tile of every image)."""
        b, c, h, w = images.shape
        if (h, w) != self.image_size:
            raise ValueError(f"expected images of size {self.image_size}, got {(h, w)}")
        out = images.new_zeros(b, len(tiles), c, *self.tile_size)  # zeros = the padding of Eq. 1
        for k, tile in enumerate(tiles):
            rows, cols = self.window(tile)
            crop = images[:, :, rows.start : min(rows.stop, h), cols.start : min(cols.stop, w)]
            out[:, k, :, : crop.shape[2], : crop.shape[3]] = crop
        return out

    def untile_sum(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, N, C, th, tw) -> (B, C, H, W) sum over overlapping tiles, padding removed."""
        b, n, c, th, tw = tiles.shape
        if n != self.num_tiles or (th, tw) != self.tile_size:
            raise ValueError(f"expected {self.num_tiles} tiles of {self.tile_size}, got {n} of {(th, tw)}")
        cols = rearrange(tiles.float(), "b n c th tw -> b (c th tw) n")
        summed = F.fold(cols, self.padded_size, self.tile_size, stride=self.stride)
        h, w = self.image_size
        return summed[..., :h, :w]

    def untile(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, N, C, th, tw) -> (B, C, H, W), overlaps averaged pixel-wise."""
        return self.untile_sum(tiles) / self.coverage().to(tiles.device)

    def add_tile(self, target: torch.Tensor, tile_maps: torch.Tensor, index: int) -> None:
        """Accumulate maps (B, th, tw) of tile ``index`` into a sum buffer (B, H, W), in place.

        Lets inference merge one slot at a time without keeping every tile map.
        """
        rows, cols = self.window(index)
        h, w = self.image_size
        rh = min(rows.stop, h) - rows.start
        rw = min(cols.stop, w) - cols.start
        target[:, rows.start : rows.start + rh, cols.start : cols.start + rw] += tile_maps[:, :rh, :rw].to(target)
