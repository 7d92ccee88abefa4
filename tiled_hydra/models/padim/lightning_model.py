"""PaDiM as a model slot: collect embeddings in one pass, fit the Gaussians at the end."""

from __future__ import annotations

import torch

from tiled_hydra.backbone import FrozenBackbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.padim.torch_model import PadimModel


class Padim(AnomalyModule):
    trainable = False

    def __init__(self, backbone: FrozenBackbone, layers: list[int], n_features: int, epsilon: float, blur_sigma: float):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False
        self.model = PadimModel(sum(backbone.channels), n_features, epsilon, blur_sigma)
        self._collected: list[torch.Tensor] = []

    @torch.no_grad()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.reduce(self.backbone(tiles))

    def training_step(self, batch, batch_idx):
        self._collected.append(batch[0].detach())

    def on_train_end(self) -> None:
        self.model.fit(torch.cat(self._collected))
        self._collected.clear()

    @torch.no_grad()
    def predict_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(self.embed(tiles), tuple(tiles.shape[-2:]))
