"""Reverse Distillation (Deng & Li, 2022): a student decoder rebuilds the frozen teacher's features.

The teacher's stages are fused and squeezed into a compact one-class embedding (OCBE); the
student decodes it back, coarse to fine, into the teacher's stages.  Trained on normal data
only, the student fails where the teacher sees something new: 1 - cosine similarity is the map.

Everything is sized from the backbone's ``channels`` and ``reductions``, so any backbone and
any tile size work (sizes that do not halve exactly are matched by interpolation).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from tiled_hydra.errors import ConfigError
from tiled_hydra.core.filters import gaussian_blur, upsample


def match_size(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Resize x to ``size`` (bilinear) only when strided convolutions rounded differently."""
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """ResNet bottleneck block (1x1 reduce, 3x3, 1x1 expand, plus a skip), optionally strided.

    The half-width bottleneck (as in Wide-ResNet) keeps the student small even on wide
    teachers: a plain 3x3 block on the 3 x 1024 fused channels of wide_resnet50_2 alone
    would hold ~90M parameters.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        width = max(8, cout // 2)
        self.body = nn.Sequential(
            conv_bn_relu(cin, width, 1),
            conv_bn_relu(width, width, 3, stride),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def stride_ratios(reductions: list[int]) -> list[int]:
    """Resolution factor between consecutive stages (2 for every timm backbone of the group)."""
    ratios = [b // a for a, b in zip(reductions, reductions[1:])]
    if any(r < 1 or a * r != b for r, a, b in zip(ratios, reductions, reductions[1:])):
        raise ConfigError(f"reverse distillation needs stages with integer stride ratios, got reductions {reductions}")
    return ratios


class OneClassBottleneck(nn.Module):
    """Multi-scale feature fusion to the coarsest stage, then a strided residual one-class embedding (OCE)."""

    def __init__(self, channels: list[int], reductions: list[int], blocks: int):
        super().__init__()
        ratios = stride_ratios(reductions)
        # Stage k reaches the coarsest grid through one strided conv per later stage, growing channels as the teacher does.
        self.fuse = nn.ModuleList(
            nn.Sequential(*(conv_bn_relu(channels[j], channels[j + 1], 3, ratios[j]) for j in range(k, len(channels) - 1)))
            for k in range(len(channels))
        )
        coarsest = channels[-1]
        self.embedding_channels = 2 * coarsest
        self.oce = nn.Sequential(
            ResidualBlock(len(channels) * coarsest, self.embedding_channels, stride=2),
            *(ResidualBlock(self.embedding_channels, self.embedding_channels) for _ in range(blocks - 1)),
        )

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        size = features[-1].shape[-2:]
        fused = torch.cat([match_size(path(f), size) for path, f in zip(self.fuse, features)], dim=1)
        return self.oce(fused)


class DecoderStage(nn.Module):
    """Upsample by ``scale`` with a transposed convolution, then residual blocks."""

    def __init__(self, cin: int, cout: int, scale: int, blocks: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size=scale, stride=scale, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(*(ResidualBlock(cout, cout) for _ in range(blocks)))

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.blocks(match_size(self.up(x), size))


class ReverseDistillationModel(nn.Module):
    """Trainable bottleneck + student decoder against the teacher's cached features."""

    def __init__(self, channels: list[int], reductions: list[int], blocks: int, blur_sigma: float):
        super().__init__()
        if blocks < 1:
            raise ConfigError(f"reverse_distillation blocks must be >= 1, got {blocks}")
        self.blur_sigma = blur_sigma
        self.bottleneck = OneClassBottleneck(channels, reductions, blocks)
        ratios = stride_ratios(reductions)
        # Decoder stages mirror the teacher from coarse to fine: embedding -> last stage -> ... -> first stage.
        ins = [self.bottleneck.embedding_channels] + channels[:0:-1]
        outs = channels[::-1]
        scales = [2] + ratios[::-1]
        self.decoder = nn.ModuleList(DecoderStage(i, o, s, blocks) for i, o, s in zip(ins, outs, scales))

    def student(self, teacher: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Student features, finest stage first (the teacher's order)."""
        x = self.bottleneck(teacher)
        outputs = []
        for stage, target in zip(self.decoder, reversed(teacher)):
            x = stage(x, target.shape[-2:])
            outputs.append(x)
        return outputs[::-1]

    def loss(self, teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Sum over stages of mean over samples of 1 - cos(teacher, student), each stage flattened to one vector."""
        total = teacher[0].new_zeros(())
        for t, s in zip(teacher, self.student(teacher)):
            total = total + (1 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
        return total

    def forward(self, teacher: tuple[torch.Tensor, ...], output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> anomaly map (B, H, W) = blurred sum over stages of per-pixel 1 - cos, and image score = max of the map."""
        maps = [
            upsample(1 - F.cosine_similarity(t, s, dim=1), output_size, mode="bilinear")
            for t, s in zip(teacher, self.student(teacher))
        ]
        anomaly_map = gaussian_blur(torch.stack(maps).sum(dim=0), self.blur_sigma)
        return anomaly_map, anomaly_map.flatten(1).amax(dim=1)
