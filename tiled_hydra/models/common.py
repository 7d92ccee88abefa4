"""Small pieces of math shared by several models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))  # +-3 sigma holds 99.7% of the mass
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) or (B, 1, H, W) maps, reflect padding; sigma<=0 is a no-op."""
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    kernel = gaussian_kernel1d(sigma, x.device, x.dtype)
    r = kernel.numel() // 2
    # reflect padding needs pad < size; fall back to replicate for tiny maps
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), kernel.view(1, 1, -1, 1))
    return x.squeeze(1) if squeeze else x


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, h, w) -> (B, H, W)."""
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, **kwargs).squeeze(1)
