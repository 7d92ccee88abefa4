"""DDAD as a model slot: train the U-Net on raw tiles, then adapt the feature extractor.

One Lightning step budget (``model.max_steps``) covers both phases, as the reference runs them
one after the other: the first ``max_steps - da_steps`` steps train the U-Net on the
noise-prediction loss, the last ``da_steps`` adapt the feature extractor on reconstructions of
training tiles (half of each batch reconstructed, conditioned on the other half).
"""

from __future__ import annotations

from typing import Annotated

import torch

from tiled_hydra.config import Among, Count, Layers, Length, NonNegative, Positive, Range, Rule, Seed, Size
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.core.tiling import as_pair
from tiled_hydra.errors import ConfigError
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.ddad.settings import UNetSize, crop_problem, tile_problem
from tiled_hydra.models.ddad.torch_model import DDADModel


class DDAD(AnomalyModule):
    trainable = True
    cache_embeddings = False  # the U-Net trains on raw tiles, not on backbone features

    def __init__(
        self,
        backbone: FrozenBackbone,
        tile_size: Annotated[Size, Rule(tile_problem)],
        size: Annotated[str, Among("sizes")],
        sizes: dict[str, UNetSize],
        layers: Layers,
        map_layers: Annotated[list[int], Length(1, 5), Among("layers")],
        layers_per_block: Count,
        halving_period: Count,
        min_channels: Count,
        attention_resolution: Annotated[int, Range(0)],  # px
        beta_start: Annotated[float, Range(0, 1, low_open=True, high_open=True)],
        beta_end: Annotated[float, Range("beta_start", 1, low_open=True, high_open=True)],
        diffusion_steps: Count,
        start: Annotated[int, Range(1, "diffusion_steps", high_open=True)],  # alpha_bar has diffusion_steps entries
        skip: Count,
        eta: Annotated[float, Range(0, 1)],  # DDIM: above 1 the deterministic part's weight turns imaginary
        w: NonNegative,
        w_da: NonNegative,
        da_lambda: NonNegative,
        v: NonNegative,
        blur_sigma: NonNegative,
        max_steps: Count,  # DDAD splits a step budget between its two phases
        da_steps: Annotated[int, Range(0, "max_steps")],
        train_crop: Annotated[int, Range(1), Rule(crop_problem)] | None,
        lr: Positive,
        weight_decay: NonNegative,
        da_lr: Positive,
        noise_seed: Seed,
    ):
        super().__init__(backbone)
        if size not in sizes:
            raise ConfigError(f"model.size={size} is not one of {', '.join(sizes)}")
        if not set(map_layers) <= set(layers):
            raise ConfigError(f"model.net.map_layers={list(map_layers)} must be a subset of model.net.layers={list(layers)}")
        if not 0 <= da_steps <= max_steps:
            raise ConfigError(f"model.net.da_steps={da_steps} must lie in 0..model.max_steps={max_steps}")
        if not 0 < start < diffusion_steps or skip <= 0:
            raise ConfigError(f"model.net: need 0 < start < diffusion_steps and skip > 0; got start={start}, skip={skip}")
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False  # two optimizers, one per phase, as the reference
        tile = as_pair(tile_size)
        unet_kwargs = dict(sizes[size], layers_per_block=layers_per_block, halving_period=halving_period,
                           min_channels=min_channels, attention_resolution=attention_resolution)
        self.model = DDADModel(backbone, tile, unet_kwargs, list(map_layers), list(layers), beta_start, beta_end,
                               diffusion_steps, start, skip, eta, w, w_da, da_lambda, v, blur_sigma)
        crop = tile if train_crop is None else (min(int(train_crop), tile[0]), min(int(train_crop), tile[1]))
        if any(c % self.model.unet.plan.downsampling for c in crop):
            raise ConfigError(f"model.net.train_crop={train_crop} must be a multiple of {self.model.unet.plan.downsampling} "
                              "(the U-Net's downsampling for this tile size), or null for whole tiles")
        self.crop = crop

    def random_crop(self, tiles: torch.Tensor) -> torch.Tensor:
        (h, w), (ch, cw) = tiles.shape[-2:], self.crop
        if (ch, cw) == (h, w):
            return tiles
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return tiles[..., top : top + ch, left : left + cw]

    def training_step(self, batch, batch_idx):
        tiles = (batch[0] if isinstance(batch, (list, tuple)) else batch) * 2 - 1
        unet_opt, fe_opt = self.optimizers()
        if self.global_step < self.hparams.max_steps - self.hparams.da_steps:
            self.model.unet.train()
            loss = self.model.diffusion_loss(self.random_crop(tiles))
            optimizer = unet_opt
        else:
            self.model.unet.eval()  # the reference reconstructs with the U-Net in eval mode
            half = max(1, len(tiles) // 2)
            target, inputs = tiles[:half], tiles[half:] if len(tiles) > 1 else tiles
            n = min(len(target), len(inputs))
            x0 = self.model.reconstruct(inputs[:n], target[:n], self.hparams.w_da)
            loss = self.model.adaptation_loss(x0, target[:n], self.backbone)
            optimizer = fe_opt
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # Reference: Adam (coupled weight decay) for the U-Net, AdamW 1e-4 for the feature extractor.
        return [
            torch.optim.Adam(self.model.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay),
            torch.optim.AdamW(self.model.feature_extractor.parameters(), lr=self.hparams.da_lr),
        ]

    @torch.no_grad()
    def predict_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The reconstruction draws noise (eta = 1): a fixed generator per call makes a tile's map
        # independent of the global RNG, so a reloaded slot predicts exactly what it predicted before.
        generator = torch.Generator().manual_seed(int(self.hparams.noise_seed))
        return self.model(tiles, generator)
