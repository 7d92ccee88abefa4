"""The interface every anomaly model implements: one instance = one model slot.

A model is split in two, as anomalib does:
- a pure ``nn.Module`` with the math (``torch_model.py`` of each model), and
- a thin LightningModule (this base class + ``lightning_model.py``) that says how it learns.

The shared frozen backbone is a registered submodule so Lightning moves it with the
slot, but it is left out of slot checkpoints (it is loaded once per run).

Data flow for one slot:
1. ``embed(tiles)``: frozen feature extraction, run exactly once per training tile
   by the ensemble; its output is cached on the CPU (tensor or tuple of tensors).
2. ``training_step(batch)``: ``batch`` is a batch of those cached embeddings.
   Memory-bank and density models collect here and finish in ``on_train_end``.
3. ``predict_tiles(tiles)``: tiles in [0, 1] -> (anomaly maps (B, th, tw), scores (B,)).

Models whose tiles reach them only through the frozen backbone set ``backbone_features``
and split both steps at the backbone: ``embed_features(features)`` and
``predict_features(features, output_size)``. The inference engine then runs the backbone
once for the tiles of every slot (``inference.mode=resident``) or once on the whole image
(``inference.features=whole_image``) and hands each slot its features.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset

from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.errors import ConfigError

BACKBONE_PREFIX = "backbone."


class AnomalyModule(L.LightningModule):
    """Base LightningModule for a model slot."""

    #: False for models that only collect statistics (no optimizer, one pass over the data).
    trainable: bool = False
    #: True: embed(tiles) == embed_features(backbone(tiles)) and predict_tiles(tiles) ==
    #: predict_features(backbone(tiles), tile size); the slot never sees pixels otherwise.
    backbone_features: bool = False
    #: True: the slot's tiles are embedded once (``embed``/``embed_features``) and the training steps
    #: see batches of those embeddings; False: they see batches of raw tiles in [0, 1] and embed them
    #: themselves (models that fold every batch into fixed-size statistics, or train on pixels).
    cache_embeddings: bool = True

    def __init__(self, backbone: FrozenBackbone):
        super().__init__()
        self.backbone = backbone

    # -- the three steps -----------------------------------------------------------
    @torch.no_grad()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Frozen features of a batch of tiles in [0, 1]; the default is the backbone's stages."""
        return self.embed_features(self.backbone(tiles))

    def embed_features(self, features: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What ``embed`` makes of the backbone's stages (B, C_s, th / r_s, tw / r_s)."""
        return tuple(features)

    def training_step(self, batch: Any, batch_idx: int):  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def predict_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.backbone_features:  # pragma: no cover - such models override predict_tiles
            raise NotImplementedError
        return self.predict_features(self.backbone(tiles), tuple(tiles.shape[-2:]))

    @torch.no_grad()
    def predict_features(self, features: list[torch.Tensor], output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone stages of a batch of tiles -> (maps (B, *output_size), scores (B,))."""
        return self.model(self.embed_features(features), output_size)

    def split_training_data(self, dataset: Dataset) -> Dataset:
        """The part of the slot's training data its training steps see (default: all of it).

        A model may keep the rest for itself, e.g. normal tiles held out for calibration.
        """
        return dataset

    # -- Lightning plumbing shared by all models -----------------------------------------
    def configure_optimizers(self):
        return None

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        tiles = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_tiles(tiles)

    # -- slot checkpoints without the shared backbone ------------------------------------
    def slot_state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
        return self.pack_state(state)

    def pack_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Smallest exact on-disk form of a slot's state (e.g. a triangular matrix as its triangle)."""
        return state

    def unpack_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack_state`."""
        return state

    def load_slot_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = self.unpack_state(dict(state))
        self.prepare_for_state(state)
        # assign: take the given tensors (e.g. memory-mapped from the checkpoint), no copy
        result = self.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not k.startswith(BACKBONE_PREFIX)]
        if missing or result.unexpected_keys:
            raise ConfigError(
                f"slot checkpoint does not fit model {type(self).__name__} (missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]}); it was written by other code or settings: use a new hydra.run.dir"
            )

    def prepare_for_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resize buffers whose shape is only known after fitting (e.g. memory banks)."""
        for name, value in state.items():
            module_name, _, buffer_name = name.rpartition(".")
            module: nn.Module = self.get_submodule(module_name) if module_name else self
            if buffer_name in module._buffers and module._buffers[buffer_name] is not None:
                if module._buffers[buffer_name].shape != value.shape:
                    module._buffers[buffer_name] = torch.empty_like(value)


class CollectingModule(AnomalyModule):
    """A slot that only collects embeddings in one pass and fits ``self.model`` at the end.

    ``self.model`` must offer ``embed(features)``, ``fit(embeddings)`` and
    ``forward(embedding, output_size) -> (maps, scores)`` (PaDiM, PatchCore).
    """

    trainable = False
    backbone_features = True

    def __init__(self, backbone: FrozenBackbone):
        super().__init__(backbone)
        self.automatic_optimization = False
        self._collected: list[torch.Tensor] = []

    def embed_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.model.embed(features)

    def training_step(self, batch, batch_idx):
        self._collected.append(batch[0].detach())

    def on_train_end(self) -> None:
        self.model.fit(torch.cat(self._collected))
        self._collected.clear()
