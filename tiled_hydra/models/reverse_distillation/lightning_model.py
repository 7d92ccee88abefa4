"""Reverse Distillation as a model slot: train bottleneck + decoder on cached teacher features."""

from __future__ import annotations

from typing import Annotated

import torch

from tiled_hydra.config import Count, Layers, Length, NonNegative, Positive, Range
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.reverse_distillation.torch_model import ReverseDistillationModel


class ReverseDistillation(AnomalyModule):
    trainable = True
    backbone_features = True

    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: Layers,
        blocks: Count,
        blur_sigma: NonNegative,
        lr: Positive,
        betas: Annotated[list[Annotated[float, Range(0, 1, high_open=True)]], Length(2)],  # Adam's
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = ReverseDistillationModel(backbone.channels, backbone.reductions, blocks, blur_sigma)

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(tuple(batch))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
