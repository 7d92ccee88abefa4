"""FastFlow as a model slot: maximise the likelihood of cached, normalised backbone features."""

from __future__ import annotations

import torch

from tiled_hydra.config import Count, Layers, NonNegative, Positive
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.fastflow.torch_model import FastflowModel


class Fastflow(AnomalyModule):
    trainable = True
    backbone_features = True

    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: Layers,
        flow_steps: Count,
        hidden_ratio: Positive,
        clamp: Positive,
        conv3x3_only: bool,
        lr: Positive,
        weight_decay: NonNegative,
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = FastflowModel(backbone.channels, flow_steps, hidden_ratio, clamp, conv3x3_only)

    def embed_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.model.embed(features)

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(tuple(batch))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
