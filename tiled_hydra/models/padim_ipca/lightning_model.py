"""PaDiM with incremental truncated PCA as a model slot: fixed memory during training.

Unlike PaDiM, this slot does not want the ensemble's embedding cache (which would hold
every training feature at once): with ``cache_embeddings = False`` the ensemble feeds raw
tiles to ``training_step``, which embeds them and folds them into the per-patch
statistics ``step`` samples at a time. Memory is then independent of the number of
training tiles: O(P * m * (k + step)) for the statistics plus one batch of features.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from tiled_hydra.config import Count, Layers, NonNegative, Range
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.padim_ipca.torch_model import PadimIPCAModel


class PadimIPCA(AnomalyModule):
    trainable = False
    #: False: ``training_step`` receives batches of raw tiles in [0, 1] (``batch[0]``,
    #: shape (B, 3, th, tw)) and embeds them itself; nothing is cached per tile.
    cache_embeddings = False
    backbone_features = True

    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: Layers,
        k: Annotated[int, Range(1, ("n_features", "channels"))] = 16,  # at most the feature dimension
        step: Count = 16,
        dtype: Literal["float64", "float32"] = "float64",
        n_features: Annotated[int, Range(1, "channels")] | None = None,
        variance_rtol: Annotated[float, Range(0, 1, high_open=True)] = 1e-6,
        blur_sigma: NonNegative = 4.0,
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.automatic_optimization = False
        self.model = PadimIPCAModel(sum(backbone.channels), n_features, k, step, dtype, variance_rtol, blur_sigma)

    def embed_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.model.features(features)

    def training_step(self, batch, batch_idx):
        tiles = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.model.partial_fit(self.embed(tiles))

    def on_train_end(self) -> None:
        self.model.finalize()
