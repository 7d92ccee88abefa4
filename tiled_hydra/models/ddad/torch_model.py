"""DDAD (Mousakhan et al. 2023): conditioned denoising diffusion + a domain-adapted feature extractor.

Images live in [-1, 1] inside the diffusion, as in the reference; the feature extractors see
them mapped back to [0, 1] and normalised like the backbone.

Timestep indexing follows the reference: ``alpha_bar(t) = prod_{s<=t} (1 - beta_s)`` for
t = 0..T-1 and ``alpha_bar(-1) = 1``.  Reconstruction noises the tile to t = ``start`` (250) and
denoises along t = start - skip, ..., skip, 0 (225, ..., 0: 10 U-Net passes), ending at t = -1.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.core.filters import gaussian_blur
from tiled_hydra.models.ddad.unet import DenoisingUNet


# -- the diffusion math, as pure functions (tested by hand) --------------------------------------------
def linear_alpha_bar(beta_start: float, beta_end: float, steps: int) -> torch.Tensor:
    """alpha_bar(t) for t = -1..T-1 at index t + 1 (index 0 is 1: no noise)."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]).float()


def noise_prediction_loss(eps: torch.Tensor, eps_pred: torch.Tensor) -> torch.Tensor:
    """Squared error of the predicted noise, summed over a tile and averaged over the batch (reference)."""
    return (eps - eps_pred).square().sum(dim=(1, 2, 3)).mean()


def conditioned_noise(eps: torch.Tensor, x_t: torch.Tensor, y0: torch.Tensor, a: torch.Tensor, w: float) -> torch.Tensor:
    """eps_hat = eps - sqrt(1 - a) w (y_t - x_t), y_t = sqrt(a) y0 + sqrt(1 - a) eps: pulls x toward y0."""
    y_t = a.sqrt() * y0 + (1 - a).sqrt() * eps
    return eps - (1 - a).sqrt() * w * (y_t - x_t)


def ddim_step(x_t: torch.Tensor, eps_hat: torch.Tensor, a: torch.Tensor, a_next: torch.Tensor, eta: float,
              noise: torch.Tensor) -> torch.Tensor:
    """One DDIM step from alpha_bar ``a`` to ``a_next`` (eta = 1: as much fresh noise as DDPM)."""
    x0_t = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    c1 = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
    c2 = ((1 - a_next) - c1**2).sqrt()
    return a_next.sqrt() * x0_t + c1 * noise + c2 * eps_hat


def cosine_distance_loss(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum over layers of mean over the batch of 1 - cos(a, b), each tile's map flattened (reference)."""
    return sum((1 - F.cosine_similarity(x.flatten(1), y.flatten(1))).mean() for x, y in zip(a, b))


# -- the two trained components ---------------------------------------------------------------------------
class FeatureExtractor(nn.Module):
    """A trainable copy of the run's backbone (same stages, same input normalisation).

    Batch-norm layers stay in eval mode: their running statistics are the backbone's ImageNet
    ones, which the frozen-copy terms of the loss measure against; updating them from batches
    of 4-8 correlated tiles would move every feature at once.  Their affine weights train.
    """

    def __init__(self, backbone: FrozenBackbone):
        super().__init__()
        self.net = backbone.unfolded_net().to(backbone.mean.device).requires_grad_(True)  # with its batch norms
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images in [0, 1]."""
        return self.net((images - self.mean) / self.std)


class DDADModel(nn.Module):
    """``unet`` and ``feature_extractor`` are the named components (the scaling study measures them)."""

    def __init__(self, backbone: FrozenBackbone, tile_size: tuple[int, int], unet_kwargs: dict, map_layers: list[int],
                 layers: list[int], beta_start: float, beta_end: float, diffusion_steps: int, start: int, skip: int,
                 eta: float, w: float, w_da: float, da_lambda: float, v: float, blur_sigma: float):
        super().__init__()
        self.unet = DenoisingUNet(tile_size, **unet_kwargs)
        self.feature_extractor = FeatureExtractor(backbone)
        self.map_index = [layers.index(layer) for layer in map_layers]
        self.register_buffer("alpha_bar", linear_alpha_bar(beta_start, beta_end, diffusion_steps), persistent=False)
        self.diffusion_steps, self.start, self.skip, self.eta = diffusion_steps, start, skip, eta
        self.w, self.w_da, self.da_lambda, self.v, self.blur_sigma = w, w_da, da_lambda, v, blur_sigma

    def a(self, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.alpha_bar.device)
        return self.alpha_bar[t + 1].view(-1, 1, 1, 1)

    # -- training ---------------------------------------------------------------------------------------
    def diffusion_loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Noise-prediction loss at a uniformly drawn timestep per tile (x0 in [-1, 1])."""
        t = torch.randint(0, self.diffusion_steps, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        a = self.a(t)
        return noise_prediction_loss(eps, self.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t))

    def adaptation_loss(self, x0: torch.Tensor, target: torch.Tensor, frozen: FrozenBackbone) -> torch.Tensor:
        """Reference DA loss: reconstruction x0 vs target through the trained copy F, each kept near the frozen F0."""
        x0, target = (x0 + 1) / 2, (target + 1) / 2
        f_x0, f_target = self.feature_extractor(x0), self.feature_extractor(target)
        f0_x0, f0_target = frozen(x0), frozen(target)
        return (cosine_distance_loss(f_x0, f_target) + self.da_lambda * cosine_distance_loss(f_target, f0_target)
                + self.da_lambda * cosine_distance_loss(f_x0, f0_x0))

    # -- reconstruction and maps --------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y0: torch.Tensor, w: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise x to t = start, then denoise conditioned on y0 (both in [-1, 1])."""
        def randn() -> torch.Tensor:
            return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

        x_t = self.a(self.start).sqrt() * x + (1 - self.a(self.start)).sqrt() * randn()
        steps = list(range(0, self.start, self.skip))
        for t, t_next in zip(reversed(steps), reversed([-1] + steps[:-1])):
            a, a_next = self.a(t), self.a(t_next)
            eps = self.unet(x_t, torch.full((len(x),), t, device=x.device))
            x_t = ddim_step(x_t, conditioned_noise(eps, x_t, y0, a, w), a, a_next, self.eta, randn())
        return x_t

    @torch.no_grad()
    def anomaly_map(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W): feature distance + v (max f / max p) pixel distance, blurred (maxima per tile)."""
        size = tuple(x.shape[-2:])
        pixel = (x0 - x).abs().mean(dim=1)
        f_x, f_x0 = self.feature_extractor((x + 1) / 2), self.feature_extractor((x0 + 1) / 2)
        feature = torch.zeros_like(pixel)
        for i in self.map_index:
            # 3x3 mean pooling over zero-padded neighbourhoods (the reference's patchify)
            p, q = (F.avg_pool2d(f[i], 3, stride=1, padding=1) for f in (f_x, f_x0))
            distance = 1 - F.cosine_similarity(p, q, dim=1)
            feature += F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        ratio = feature.flatten(1).amax(1) / pixel.flatten(1).amax(1).clamp_min(1e-12)
        return gaussian_blur(feature + self.v * ratio.view(-1, 1, 1) * pixel, self.blur_sigma)

    @torch.no_grad()
    def forward(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tiles in [0, 1] -> (maps (B, H, W), scores = map maxima (B,))."""
        x = tiles * 2 - 1
        maps = self.anomaly_map(self.reconstruct(x, x, self.w, generator), x)
        return maps, maps.flatten(1).amax(1)
