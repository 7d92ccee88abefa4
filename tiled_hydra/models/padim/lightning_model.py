"""PaDiM as a model slot: collect embeddings in one pass, fit the Gaussians at the end."""

from __future__ import annotations

from typing import Annotated

from tiled_hydra.config import Layers, NonNegative, Positive, Range
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import CollectingModule
from tiled_hydra.models.padim.torch_model import PadimModel


class Padim(CollectingModule):
    def __init__(
        self,
        backbone: FrozenBackbone,
        layers: Layers,
        n_features: Annotated[int, Range(1, "channels")],  # a random subset of the stages' channels
        epsilon: Positive,  # keeps every covariance invertible
        blur_sigma: NonNegative,
    ):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = PadimModel(sum(backbone.channels), n_features, epsilon, blur_sigma)

    def pack_state(self, state):
        return self.model.pack_state(state, "model.")

    def unpack_state(self, state):
        return self.model.unpack_state(state, "model.")
