"""Backbone features of the tiles a slot serves: the one place training and inference get them.

Two ways (``inference.features``, part of the slot fingerprint because training must use the same):

``per_tile``
    each tile is cut from the uint8 image (zero padding past the border, paper Eq. 1) and the
    frozen backbone runs on it alone.
``whole_image``
    the backbone runs once on the whole (padded) image and each tile's feature maps are cut from
    its stages, so overlapping tiles do not compute their overlap again. Stages of an image set
    are computed once and held in host memory while every slot cuts its tiles from them. Needs
    tile and stride to be multiples of the backbone's largest reduction.

Tiles of one batch are image-major: (image 0: tiles..., image 1: tiles...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tiled_hydra.core.tiling import TileGrid
from tiled_hydra.errors import ConfigError

FEATURES = ("per_tile", "whole_image")
#: Pixels per backbone call when none is configured (two 256 px tiles).
DEFAULT_CHUNK_PIXELS = 2 * 256 * 256


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


def chunks(count: int, per_chunk: int) -> Iterator[slice]:
    """Consecutive slices of ``count`` items, ``per_chunk`` (at least 1) at a time."""
    per_chunk = max(1, per_chunk)
    for start in range(0, count, per_chunk):
        yield slice(start, min(start + per_chunk, count))


def run_backbone(backbone, images: torch.Tensor, max_pixels: int) -> list[torch.Tensor]:
    """The backbone's stages of a batch, computed a few images at a time (at most ``max_pixels`` per call).

    Why: a convolution network's activations grow with the batch; at 32 tiles of 256 px
    EfficientNet-Lite0's largest ones are ~200 MB. glibc serves allocations above 32 MB with a
    fresh mmap and returns them on free, so every batch page-faulted ~3 GB of new zeroed memory
    (half of the CPU time went to the kernel). Below that size freed memory is reused. The
    stages are the same per image (eval mode), only float rounding of the convolutions may differ.
    """
    per_call = max(1, max_pixels // (images.shape[-2] * images.shape[-1]))
    if len(images) <= per_call:
        return backbone(images)
    out: list[torch.Tensor] = []
    for start in range(0, len(images), per_call):
        stages = backbone(images[start : start + per_call])
        if not out:
            out = [s.new_empty(len(images), *s.shape[1:]) for s in stages]
        for buffer, stage in zip(out, stages):
            buffer[start : start + len(stage)] = stage
        del stages
    return out


def check_whole_image(grid: TileGrid, reductions: Sequence[int]) -> int:
    """The largest backbone reduction, once tile and stride are checked to be multiples of it."""
    reduction = max(reductions)
    for what, size in (("tile_size", grid.tile_size), ("stride", grid.stride)):
        if any(v % reduction for v in size):
            raise ConfigError(
                f"inference.features=whole_image needs setup.{what} {list(size)} to be a multiple of the backbone's "
                f"reduction {reduction}; change setup.{what} or use inference.features=per_tile"
            )
    return reduction


def whole_image_features(backbone, images: torch.Tensor, grid: TileGrid, device: torch.device,
                         max_pixels: int = DEFAULT_CHUNK_PIXELS) -> list[torch.Tensor]:
    """Backbone stages of whole uint8 images, zero-padded to the grid's padded size as tiling does."""
    (h, w), (ph, pw) = grid.image_size, grid.padded_size
    padded = F.pad(as_unit_float(images.to(device)), (0, pw - w, 0, ph - h))
    return run_backbone(backbone, padded, max_pixels)


def cut_tile_features(features: Sequence[torch.Tensor], grid: TileGrid, tiles: Sequence[int],
                      reductions: Sequence[int]) -> list[torch.Tensor]:
    """Whole-image stages (B, C, Hp / r, Wp / r) -> the stages of ``tiles``, image-major (B * len(tiles), C, th / r, tw / r)."""
    out = []
    for stage, r in zip(features, reductions):
        crops = []
        for tile in tiles:
            rows, cols = grid.window(tile)
            crops.append(stage[:, :, rows.start // r : rows.stop // r, cols.start // r : cols.stop // r])
        out.append(torch.stack(crops, dim=1).flatten(0, 1))
    return out


class TileFeatures:
    """Pixels and backbone features of any tiles of any images, as ``mode`` says (see module doc)."""

    def __init__(self, backbone, grid: TileGrid, device: torch.device, mode: str = "per_tile",
                 chunk_pixels: int = DEFAULT_CHUNK_PIXELS, batch_size: int = 32):
        if mode not in FEATURES:
            raise ConfigError(f"inference.features={mode!r}: choose one of {', '.join(FEATURES)}")
        if chunk_pixels < 1:
            raise ConfigError(f"inference.backbone_chunk_pixels must be >= 1, got {chunk_pixels}")
        self.backbone, self.grid, self.device, self.mode = backbone, grid, device, mode
        self.chunk_pixels, self.batch_size = chunk_pixels, batch_size
        self.reductions = list(backbone.reductions)
        if mode == "whole_image":
            check_whole_image(grid, self.reductions)
        self._held: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (images, their stages)

    @property
    def whole_image(self) -> bool:
        return self.mode == "whole_image"

    def pixels(self, images: torch.Tensor, chunk: slice, tiles: Sequence[int]) -> torch.Tensor:
        """Tiles of ``images[chunk]`` as floats in [0, 1] on the device, image-major."""
        return as_unit_float(self.grid.tile_subset(images[chunk], list(tiles)).flatten(0, 1).to(self.device))

    def of_tiles(self, images: torch.Tensor, chunk: slice, tiles: Sequence[int], hold: bool = True) -> list[torch.Tensor]:
        """Backbone stages of the tiles of ``images[chunk]``, image-major. ``hold``: with whole-image
        features, the stages of every image of ``images`` are computed once and kept in host memory
        for the next calls (every slot cuts from them) until :meth:`release`; otherwise only this chunk."""
        if not self.whole_image:
            return run_backbone(self.backbone, self.pixels(images, chunk, tiles), self.chunk_pixels)
        if not hold:
            whole = whole_image_features(self.backbone, images[chunk], self.grid, self.device, self.chunk_pixels)
            return cut_tile_features(whole, self.grid, tiles, self.reductions)
        held = self.held_stages(images)
        return cut_tile_features([s[chunk].to(self.device) for s in held], self.grid, tiles, self.reductions)

    def predict(self, model, images: torch.Tensor, chunk: slice, tiles: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot model's tile maps (B * len(tiles), th, tw) and scores of the tiles of ``images[chunk]``:
        from backbone features for models that take them, else from the tiles' pixels."""
        if model.backbone_features:
            return model.predict_features(self.of_tiles(images, chunk, tiles), self.grid.tile_size)
        return model.predict_tiles(self.pixels(images, chunk, tiles))

    def held_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Whole-image stages of every image of ``images`` in host memory, computed on first use
        (~2.7 MB per 512 px image for Lite0 stages [1, 2, 3])."""
        for held, stages in self._held:
            if held is images:
                return stages
        parts = [[f.cpu() for f in whole_image_features(self.backbone, images[c], self.grid, self.device, self.chunk_pixels)]
                 for c in chunks(len(images), self.batch_size // self.grid.num_tiles)]
        stages = [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))] if parts else \
            [torch.empty(0)] * len(self.reductions)
        self._held.append((images, stages))
        return stages

    def release(self) -> None:
        """Free the held whole-image stages."""
        self._held.clear()
