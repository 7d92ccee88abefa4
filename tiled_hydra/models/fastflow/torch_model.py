"""FastFlow (Yu et al., 2021): a 2D normalizing flow per feature scale of a frozen backbone.

Normal patches are mapped to a standard Gaussian; a patch whose latent z is far from the
origin is unlikely, hence anomalous.  The coupling code is our own (no flow library): the
one maintained on PyPI (FrEIA) has had no release since 2022 and would be a new dependency
for about forty lines of math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.core.filters import upsample


def normalize(feature: torch.Tensor) -> torch.Tensor:
    """Layer norm over (C, H, W) of each sample, without an affine part.

    anomalib's LayerNorm carries a (C, H, W)-shaped affine, which ties a model to one tile
    size; without it the flow works at any tile size and the normalisation can be cached.
    """
    return F.layer_norm(feature, feature.shape[1:])


class AffineCoupling(nn.Module):
    """One flow step: y2 = x2 * exp(s(x1)) + t(x1) on a channel split, then a fixed channel permutation.

    The log-scale is soft-clamped to (-clamp, clamp) with tanh so that exp() stays bounded.
    """

    def __init__(self, channels: int, kernel_size: int, hidden_ratio: float, clamp: float):
        super().__init__()
        self.split = channels // 2
        self.clamp = clamp
        hidden = max(1, int(self.split * hidden_ratio))
        padding = kernel_size // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(self.split, hidden, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * (channels - self.split), kernel_size, padding=padding),
        )
        # Start as the identity map: training begins from a well-conditioned flow.
        nn.init.zeros_(self.subnet[-1].weight)
        nn.init.zeros_(self.subnet[-1].bias)
        # Random but fixed (stored in checkpoints), drawn from the seeded global RNG.
        self.register_buffer("permutation", torch.randperm(channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> y (B, C, H, W) and log|det dy/dx| (B,)."""
        x1, x2 = x[:, : self.split], x[:, self.split :]
        log_scale, shift = self.subnet(x1).chunk(2, dim=1)
        log_scale = self.clamp * torch.tanh(log_scale / self.clamp)
        y = torch.cat([x1, x2 * torch.exp(log_scale) + shift], dim=1)
        return y[:, self.permutation], log_scale.flatten(1).sum(dim=1)


class Flow2d(nn.Module):
    """A stack of couplings whose subnets alternate 3x3 and 1x1 convolutions (FastFlow's choice)."""

    def __init__(self, channels: int, steps: int, hidden_ratio: float, clamp: float, conv3x3_only: bool):
        super().__init__()
        self.steps = nn.ModuleList(
            AffineCoupling(channels, 3 if conv3x3_only or i % 2 == 0 else 1, hidden_ratio, clamp) for i in range(steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_det = step(x)
            log_det = log_det + step_log_det
        return x, log_det


class FastflowModel(nn.Module):
    """One flow per backbone stage; the loss, the anomaly map and the image score."""

    def __init__(self, channels: list[int], flow_steps: int, hidden_ratio: float, clamp: float, conv3x3_only: bool):
        super().__init__()
        if flow_steps < 1 or hidden_ratio <= 0 or clamp <= 0:
            raise ConfigError("fastflow needs flow_steps >= 1, hidden_ratio > 0 and clamp > 0")
        self.flows = nn.ModuleList(Flow2d(c, flow_steps, hidden_ratio, clamp, conv3x3_only) for c in channels)

    def embed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(normalize(f) for f in features)

    def latents(self, features: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [flow(f) for flow, f in zip(self.flows, features)]

    def loss(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Negative log-likelihood under N(0, I) (constants dropped), summed over scales, mean over the batch."""
        total = features[0].new_zeros(())
        for z, log_det in self.latents(features):
            total = total + (0.5 * z.pow(2).flatten(1).sum(dim=1) - log_det).mean()
        return total

    def forward(self, features: tuple[torch.Tensor, ...], output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> anomaly map (B, H, W) = mean over scales of -exp(-0.5 mean_c z^2), and image score = max of the map."""
        maps = [
            upsample(-torch.exp(-0.5 * z.pow(2).mean(dim=1)), output_size, mode="bilinear")
            for z, _ in self.latents(features)
        ]
        anomaly_map = torch.stack(maps).mean(dim=0)
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)
