"""PatchCore as a model slot: collect patch embeddings in one pass, build the coreset at the end."""

from __future__ import annotations

from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import CollectingModule
from tiled_hydra.models.patchcore.torch_model import PatchcoreModel


class Patchcore(CollectingModule):
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
        self.model = PatchcoreModel(pool_size, coreset_ratio, projection_dim, num_neighbors, blur_sigma)
