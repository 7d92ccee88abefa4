"""PaDiM as a model slot: collect embeddings in one pass, fit the Gaussians at the end."""

from __future__ import annotations

from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import CollectingModule
from tiled_hydra.models.padim.torch_model import PadimModel


class Padim(CollectingModule):
    def __init__(self, backbone: FrozenBackbone, layers: list[int], n_features: int, epsilon: float, blur_sigma: float):
        super().__init__(backbone)
        self.save_hyperparameters(ignore=["backbone"])
        self.model = PadimModel(sum(backbone.channels), n_features, epsilon, blur_sigma)

    def pack_state(self, state):
        return self.model.pack_state(state, "model.")

    def unpack_state(self, state):
        return self.model.unpack_state(state, "model.")
