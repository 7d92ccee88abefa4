"""The guided-diffusion U-Net of DDAD, built with diffusers' ``UNet2DModel``, for any tile size.

diffusers expresses the guided-diffusion design directly: residual blocks with timestep
scale-shift (``resnet_time_scale_shift="scale_shift"``), ``layers_per_block`` res blocks per
level on the way down and one more on the way up, down/up-sampling by res blocks
(``downsample_type="resnet"``), attention blocks at chosen levels and in the middle block.
Two things it cannot say in its constructor are set right after it: a fixed number of heads
at every attention level (diffusers fixes the head width instead), and a timestep embedding
as wide as the base width when the top level is narrower (diffusers ties it to the top level).

The reference hard-codes channel multipliers for four image sizes.  Here the plan is derived:
levels go down to a lowest resolution of ``bottom`` px (8, as the reference at every size), the
two lowest levels are ``4 x width`` wide, and going up the width halves every
``halving_period`` levels.  ``halving_period=2`` reproduces the reference at 256 px (1,1,2,2,4,4)
and 512 px (0.5,1,1,2,2,4,4); ``1`` narrows the high-resolution levels, where nearly all the
compute of a CPU forward pass goes.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d import UNet2DModel
from torch import nn

from tiled_hydra.models.ddad.settings import ChannelPlan, channel_plan

__all__ = ["ChannelPlan", "DenoisingUNet", "build_unet", "channel_plan"]


def build_unet(plan: ChannelPlan, width: int, heads: int, dropout: float, layers_per_block: int) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in plan.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(plan.attention))
    unet = UNet2DModel(
        in_channels=3, out_channels=3, block_out_channels=plan.widths, down_block_types=down, up_block_types=up,
        layers_per_block=layers_per_block, downsample_type="resnet", upsample_type="resnet",
        resnet_time_scale_shift="scale_shift", dropout=dropout, norm_num_groups=plan.groups,
        attention_head_dim=max(plan.widths[-1] // heads, 1), time_embedding_dim=4 * width,
        flip_sin_to_cos=True, freq_shift=0,  # guided diffusion's [cos, sin] embedding
    )
    # Sinusoidal timestep features as wide as the base width (guided diffusion), not the top level.
    unet.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
    unet.time_embedding = TimestepEmbedding(width, 4 * width)
    # The same number of heads at every attention level (the head width follows the channels).
    for module in unet.modules():
        if isinstance(module, Attention):
            module.heads = heads
    return unet


class DenoisingUNet(nn.Module):
    """eps_theta(x_t, t): the predicted noise of a noised tile, same shape as the tile."""

    def __init__(self, tile_size: tuple[int, int], width: int, heads: int, dropout: float, layers_per_block: int,
                 halving_period: int, min_channels: int, attention_resolution: int):
        super().__init__()
        self.plan = channel_plan(tile_size, width, halving_period, min_channels, attention_resolution)
        # channels-last: oneDNN's convolutions on 8-32 channel maps run ~1.7x faster on CPU (measured)
        self.net = build_unet(self.plan, width, heads, dropout, layers_per_block).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last), t.float()).sample
