"""PatchCore as a model slot: collect patch embeddings in one pass, build the coreset at the end."""

from __future__ import annotations

import torch

from tiled_hydra.backbone import FrozenBackbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.patchcore.torch_model import PatchcoreModel


class Patchcore(AnomalyModule):
    trainable = False

    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: list[int],
        pool_size: int,
        coreset_ratio: float,
        projection_dim: int,
        num_neighbors: int,
        blur_sigma: float,
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False
        self.model = PatchcoreModel(pool_size, coreset_ratio, projection_dim, num_neighbors, blur_sigma)
        self._collected: list[torch.Tensor] = []

    @torch.no_grad()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.model.embed(self.backbone(tiles))

    def training_step(self, batch, batch_idx):
        self._collected.append(batch[0].detach())

    def on_train_end(self) -> None:
        self.model.fit(torch.cat(self._collected))
        self._collected.clear()

    @torch.no_grad()
    def predict_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(self.embed(tiles), tuple(tiles.shape[-2:]))
