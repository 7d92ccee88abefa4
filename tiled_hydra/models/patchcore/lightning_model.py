"""PatchCore as a model slot: collect patch embeddings in one pass, build the coreset at the end."""

from __future__ import annotations

from typing import Annotated

from tiled_hydra.config import Count, Layers, NonNegative, Odd, Range
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import CollectingModule
from tiled_hydra.models.patchcore.torch_model import PatchcoreModel


class Patchcore(CollectingModule):
    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: Layers,
        pool_size: Annotated[int, Range(1), Odd()],  # a centred neighbourhood
        coreset_ratio: Annotated[float, Range(0, 1, low_open=True)],
        projection_dim: Annotated[int, Range(0)],  # 0: no projection
        num_neighbors: Count,
        blur_sigma: NonNegative,
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = PatchcoreModel(pool_size, coreset_ratio, projection_dim, num_neighbors, blur_sigma)
