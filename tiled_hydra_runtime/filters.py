"""The map filters of the merge in numpy, computed as tiled_hydra.core.filters computes them in
float32: the separable Gaussian blur (reflect padding, replicate for maps too small to reflect)
and the bilinear resize with half-pixel centres (torch's ``align_corners=False``)."""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=F32)
    kernel = np.exp(F32(-0.5) * (x / F32(sigma)) ** 2)
    return kernel / kernel.sum(dtype=F32)


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) float32 maps: rows first, then columns."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma)
    r = len(kernel) // 2
    mode = "reflect" if min(maps.shape[-2:]) > r else "edge"
    width, height = maps.shape[-1], maps.shape[-2]
    padded = np.pad(maps, ((0, 0), (0, 0), (r, r)), mode=mode)
    rows = np.zeros_like(maps)
    for k, weight in enumerate(kernel):
        rows += weight * padded[:, :, k : k + width]
    padded = np.pad(rows, ((0, 0), (r, r), (0, 0)), mode=mode)
    out = np.zeros_like(maps)
    for k, weight in enumerate(kernel):
        out += weight * padded[:, k : k + height, :]
    return out


def _bilinear_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and the weight of high, per output index."""
    scale = F32(size_in / size_out)
    source = np.maximum(scale * (np.arange(size_out, dtype=F32) + F32(0.5)) - F32(0.5), F32(0))
    low = np.minimum(source.astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (source - low).astype(F32)


def resize_bilinear(image_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32, bilinear with half-pixel centres and no antialiasing."""
    image_map = np.asarray(image_map, dtype=F32)
    if image_map.shape == tuple(size):
        return image_map
    r0, r1, ry = _bilinear_axis(image_map.shape[0], size[0])
    c0, c1, cx = _bilinear_axis(image_map.shape[1], size[1])
    top = image_map[r0][:, c0] * (1 - cx) + image_map[r0][:, c1] * cx
    bottom = image_map[r1][:, c0] * (1 - cx) + image_map[r1][:, c1] * cx
    return (top * (1 - ry)[:, None] + bottom * ry[:, None]).astype(F32)
