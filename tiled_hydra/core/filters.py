"""Map filters shared by the models and the merge: Gaussian blur and upsampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))  # +-3 sigma holds 99.7% of the mass
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


#: Bytes of the convolution's unfolded input (kernel x map pixels x 4 B) per call of the blur:
#: under glibc's 32 MB mmap threshold, so the memory is reused from call to call instead of
#: being freshly page-faulted (a batch of 32 tiles at once unfolded ~200 MB per call).
_BLUR_CHUNK_BYTES = 16 * 2**20


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
    per_call = max(1, _BLUR_CHUNK_BYTES // (kernel.numel() * x.shape[-2] * x.shape[-1] * x.element_size()))
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], per_call):
        part = F.conv2d(F.pad(x[start : start + per_call], (r, r, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
        out[start : start + per_call] = F.conv2d(F.pad(part, (0, 0, r, r), mode=mode), kernel.view(1, 1, -1, 1))
    return out.squeeze(1) if squeeze else out


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, h, w) -> (B, H, W)."""
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1), size=size, mode=mode, **kwargs).squeeze(1)
