"""EfficientAD (Batzner et al., WACV 2024): the pure torch part.

Three named networks, direct children of :class:`EfficientAdModel` so that memory and
runtime can be measured per component (paper 003):

- ``teacher``: a patch description network (PDN), frozen, its outputs normalised per channel;
- ``student``: a PDN of the same size with twice the channels: the first 384 imitate the
  teacher, the last 384 imitate the autoencoder;
- ``autoencoder``: encodes the whole tile into a small latent and decodes teacher-like features.

Every spatial size is derived from the input, per axis, so any tile of at least 64 px, square
or not, works (the reference hard-codes 256 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.models.efficient_ad.settings import MIN_TILE

PRECISIONS = ("32", "bf16")  # of the three networks' convolutions; maps, losses and statistics stay float32
OUT_CHANNELS = 384  # teacher feature channels (the student has twice as many)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAP_PAD = 4  # an unpadded PDN output cell i sees input rows [4i, 4i + 33): padding the map by 4 centres it


def pdn(size: str, out_channels: int, padded: bool = False) -> nn.Sequential:
    """Patch description network; module indices match the public EfficientAD teacher files."""
    p = 1 if padded else 0
    if size == "small":
        layers = [
            nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        ]
    elif size == "medium":
        layers = [
            nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
            nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        ]
    else:
        raise ConfigError(f"model.size must be small or medium, got '{size}'")
    return nn.Sequential(*layers)


def pdn_output_size(side: int) -> int:
    """Side of an unpadded PDN's output (small and medium agree): 256 -> 56, 64 -> 8."""
    side = (side - 3) // 2  # conv 4x4, avg-pool 2/2
    side = (side - 3) // 2  # conv 4x4, avg-pool 2/2
    return side - 2 - 3  # conv 3x3, conv 4x4 (the 1x1 convs keep the size)


def check_tile(height: int, width: int) -> None:
    if min(height, width) < MIN_TILE:
        raise ConfigError(f"efficient_ad needs tiles of at least {MIN_TILE} px per side, got {height}x{width}: raise setup.tile_size")


def encoder_sizes(side: int) -> list[int]:
    """Sides after each of the five 4x4 stride-2 convolutions (padding 1): 256 -> 128 ... 8."""
    sizes = []
    for _ in range(5):
        side = (side + 2 - 4) // 2 + 1
        sizes.append(side)
    return sizes


def latent_kernel(side: int) -> int:
    """The reference's 8x8 latent convolution, shrunk to the encoder output when it is smaller (tiles < 256 px)."""
    return min(8, encoder_sizes(side)[-1])


def decoder_sizes(side: int) -> list[int]:
    """Upsampling targets of the six decoder blocks: 256 -> 3, 8, 15, 32, 63, 127 (the reference's sizes).

    Each block's 4x4 convolution with padding 2 adds one pixel, so the blocks end at about
    side/64, side/32, ..., side/2; the last upsampling goes to the PDN output size.
    """
    plan = [(64, -1), (32, 0), (16, -1), (8, 0), (4, -1), (2, -1)]
    return [max(1, side // d + offset) for d, offset in plan]


class AutoEncoder(nn.Module):
    """Encoder 3->32->32->64->64->64 (4x4, stride 2) + latent conv, decoder of six upsample blocks."""

    def __init__(self, tile_size: tuple[int, int], out_channels: int = OUT_CHANNELS, dropout: float = 0.2):
        super().__init__()
        height, width = tile_size
        check_tile(height, width)
        self.tile_size = (height, width)
        channels = [3, 32, 32, 64, 64, 64]
        encoder: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            encoder += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        encoder.append(nn.Conv2d(64, 64, (latent_kernel(height), latent_kernel(width))))
        self.encoder = nn.Sequential(*encoder)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64, 64, 4, padding=2), nn.ReLU(inplace=True), nn.Dropout(dropout)) for _ in range(6)
        )
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, padding=1)
        )
        self.upsample_sizes = list(zip(decoder_sizes(height), decoder_sizes(width)))
        self.output_size = (pdn_output_size(height), pdn_output_size(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.tile_size:
            raise ValueError(f"autoencoder built for {self.tile_size} tiles got {tuple(x.shape[-2:])}")
        x = self.encoder(x)
        for size, block in zip(self.upsample_sizes, self.blocks):
            x = block(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        x = F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)
        return self.head(x)


# -- the math of the losses and the map normalisation ------------------------------------------------
def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for tensors of any size.

    torch.quantile refuses inputs over 2^24 elements (large maps, big batches); two
    ``kthvalue`` selections give the same number without that limit.
    """
    flat = values.detach().flatten().float()
    position = q * (flat.numel() - 1)
    low, high = math.floor(position), math.ceil(position)
    low_value = flat.kthvalue(low + 1).values
    if high == low:
        return low_value
    high_value = flat.kthvalue(high + 1).values
    return low_value + (position - low) * (high_value - low_value)


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, q: float) -> torch.Tensor:
    """Mean of the squared differences at or above their q-quantile (the hardest features only)."""
    distance = (teacher - student).pow(2)
    threshold = quantile(distance, q)
    return distance[distance >= threshold].mean()


def penalty_loss(student_on_other_images: torch.Tensor) -> torch.Tensor:
    """Mean squared student output on out-of-domain images: keeps the student from generalising beyond the normal data."""
    return student_on_other_images.pow(2).mean()


def normalize_map(anomaly_map: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Map the q_a quantile of normal maps to 0 and q_b to 0.1, so the ST and AE maps add on one scale."""
    return 0.1 * (anomaly_map - q_a) / (q_b - q_a).clamp_min(1e-12)


class EfficientAdModel(nn.Module):
    """Teacher, student and autoencoder with the normalisation statistics they are used with."""

    def __init__(self, size: str, tile_size: tuple[int, int], dropout: float = 0.2, precision: str = "32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"efficient_ad: model.net.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        self.size = size
        self.precision = precision
        self.teacher = pdn(size, OUT_CHANNELS).requires_grad_(False)
        self.student = pdn(size, 2 * OUT_CHANNELS)
        self.autoencoder = AutoEncoder(tile_size, OUT_CHANNELS, dropout)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Fitted on the slot's data: teacher channel statistics, then the map quantiles.
        self.register_buffer("teacher_mean", torch.zeros(1, OUT_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, OUT_CHANNELS, 1, 1))
        self.register_buffer("quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # q_st_a, q_st_b, q_ae_a, q_ae_b

    def train(self, mode: bool = True) -> "EfficientAdModel":
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    def prepare(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles in [0, 1] -> the ImageNet-normalised input all three networks were made for."""
        return (tiles - self.input_mean) / self.input_std

    def convolutions(self, x: torch.Tensor):
        """The context the networks run in: bfloat16 autocast with ``precision="bf16"`` (about 1.9x
        faster on CPUs with AVX512-BF16 and on recent GPUs); their outputs are cast back to float32."""
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        with self.convolutions(x):
            out = self.teacher(x)
        return (out.float() - self.teacher_mean) / self.teacher_std

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The autoencoder's teacher-like features of whole tiles."""
        with self.convolutions(x):
            out = self.autoencoder(x)
        return out.float()

    @torch.no_grad()
    def fit_teacher_statistics(self, batches) -> None:
        """Per-channel mean and std of the teacher's outputs over an iterable of prepared inputs."""
        count, total, total_sq = 0, 0.0, 0.0
        for x in batches:
            with self.convolutions(x):
                out = self.teacher(x)
            out = out.double()
            count += out.numel() // out.shape[1]
            total = total + out.sum(dim=(0, 2, 3))
            total_sq = total_sq + out.pow(2).sum(dim=(0, 2, 3))
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
        self.teacher_mean.copy_(mean.view(1, -1, 1, 1).float())
        self.teacher_std.copy_(std.clamp_min(1e-6).view(1, -1, 1, 1).float())

    def student_half(self, x: torch.Tensor, half: int) -> torch.Tensor:
        """The student's first (0: teacher-like) or second (1: autoencoder-like) 384 channels only.

        Equal to ``self.student(x)[:, half * 384 : (half + 1) * 384]``, gradients included, but the
        last convolution computes only the channels asked for: in training every student pass uses
        one half, and the small PDN's last 4x4 convolution is about half of its cost.
        """
        *trunk, last = self.student
        keep = slice(half * OUT_CHANNELS, (half + 1) * OUT_CHANNELS)
        with self.convolutions(x):
            for layer in trunk:
                x = layer(x)
            x = F.conv2d(x, last.weight[keep], last.bias[keep], last.stride, last.padding)
        return x.float()

    def raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised ST and AE maps (B, h, w) at the PDN's output resolution."""
        teacher = self.teacher_features(x)
        with self.convolutions(x):
            student = self.student(x)
        student = student.float()
        autoencoder = self.reconstruct(x)
        map_st = (teacher - student[:, :OUT_CHANNELS]).pow(2).mean(dim=1)
        map_ae = (autoencoder - student[:, OUT_CHANNELS:]).pow(2).mean(dim=1)
        return map_st, map_ae

    @torch.no_grad()
    def fit_quantiles(self, map_st: torch.Tensor, map_ae: torch.Tensor, q_a: float, q_b: float) -> None:
        self.quantiles.copy_(torch.stack([quantile(map_st, q_a), quantile(map_st, q_b), quantile(map_ae, q_a), quantile(map_ae, q_b)]))

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles in [0, 1] (B, 3, H, W) -> anomaly map (B, H, W) = 0.5 ST + 0.5 AE, and image score = max of the map."""
        map_st, map_ae = self.raw_maps(self.prepare(tiles))
        q = self.quantiles
        anomaly_map = 0.5 * normalize_map(map_st, q[0], q[1]) + 0.5 * normalize_map(map_ae, q[2], q[3])
        anomaly_map = F.pad(anomaly_map.unsqueeze(1), (MAP_PAD,) * 4)
        anomaly_map = F.interpolate(anomaly_map, size=tuple(tiles.shape[-2:]), mode="bilinear", align_corners=False).squeeze(1)
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)
