"""Train one model per slot, one slot after another (prediction: :mod:`tiled_hydra.inference`).

A *slot* is a model together with the tile locations it serves: a tiled ensemble has
one slot per location, a shared-tile setup one slot for all locations (tiles stacked
batch-wise), a single model a 1x1 grid.  Only one slot is ever resident on the
accelerator; trained slots live in per-slot checkpoints on disk, which also make an
interrupted run resumable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tiled_hydra import __version__
from tiled_hydra.backbone import FrozenBackbone
from tiled_hydra.errors import ConfigError, instantiate_checked
from tiled_hydra.inference import check_whole_image, chunk_pixels, cut_tile_features, run_backbone, whole_image_features
from tiled_hydra.memory import PeakMemory
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.tiling import TileGrid

log = logging.getLogger(__name__)

# Lightning announces its accelerator and tips at INFO on every Trainer, i.e. once per slot.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
# Expected for every slot, so not worth a warning each time: the frozen backbone is in eval
# mode on purpose, and statistics-only models (PaDiM, PatchCore) have no optimizer.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
warnings.filterwarnings("ignore", message=".*`configure_optimizers` returned `None`.*")


def slot_tiles(grid: TileGrid, shared: bool) -> list[list[int]]:
    """Tile indices served by each slot: all tiles in one slot, or one slot per tile."""
    tiles = list(range(grid.num_tiles))
    return [tiles] if shared else [[t] for t in tiles]


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that determines a slot's weights, to refuse resuming a different run."""
    keys = ("dataset", "backbone", "model", "setup", "seed")
    content = {"version": __version__, "features": str(cfg.get("inference", {}).get("features", "per_tile"))}
    content |= {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k] for k in keys}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def iter_tile_batches(images: torch.Tensor, grid: TileGrid, tiles: list[int], tiles_per_batch: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (image slice, float tiles in [0, 1]) with about ``tiles_per_batch`` tiles each.

    Tiles of one image batch are ordered image-major: (image 0: tiles..., image 1: tiles...).
    """
    per_batch = max(1, tiles_per_batch // len(tiles))
    for start in range(0, len(images), per_batch):
        chunk = slice(start, min(start + per_batch, len(images)))
        tiled = grid.tile_subset(images[chunk], tiles)  # uint8 until the tiles are cut
        yield chunk, tiled.flatten(0, 1).float().div_(255)


class LazyTiles(Dataset):
    """Tiles of one slot cut on demand from the uint8 images: memory stays flat for models
    that fold raw tiles into fixed-size statistics (``cache_embeddings = False``)."""

    def __init__(self, images: torch.Tensor, grid: TileGrid, tiles: list[int]):
        self.images, self.grid, self.tiles = images, grid, tiles

    def __len__(self) -> int:
        return len(self.images) * len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        image, k = divmod(index, len(self.tiles))
        tile = self.grid.tile_subset(self.images[image : image + 1], [self.tiles[k]])[0, 0]
        return (tile.float().div_(255),)


@dataclass
class SlotRunner:
    """Trains and predicts the slots of one run."""

    cfg: DictConfig
    grid: TileGrid
    backbone: FrozenBackbone
    device: torch.device
    checkpoint_dir: Path
    trainer_kwargs: dict

    def __post_init__(self) -> None:
        self.slots = slot_tiles(self.grid, bool(self.cfg.setup.shared))
        self.fingerprint = config_fingerprint(self.cfg)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    # -- construction and checkpoints ----------------------------------------------------
    def new_model(self, slot: int) -> AnomalyModule:
        # Seeding per slot makes a resumed run identical to an uninterrupted one.
        L.seed_everything(int(self.cfg.seed) + slot, workers=True, verbose=False)
        return instantiate_checked(self.cfg.model.net, backbone=self.backbone)

    def checkpoint_path(self, slot: int) -> Path:
        return self.checkpoint_dir / f"slot_{slot:03d}.pt"

    def save(self, slot: int, model: AnomalyModule) -> None:
        path = self.checkpoint_path(slot)
        tmp = path.with_suffix(".tmp")
        torch.save({"fingerprint": self.fingerprint, "tiles": self.slots[slot], "state": model.slot_state_dict()}, tmp)
        os.replace(tmp, path)  # atomic: a checkpoint on disk is always complete

    def load(self, slot: int) -> AnomalyModule:
        # mmap: the slot's tensors are the file's pages (assigned, not copied into fresh buffers)
        payload = torch.load(self.checkpoint_path(slot), map_location="cpu", weights_only=True, mmap=True)
        if payload["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"{self.checkpoint_path(slot)} was written by a different configuration; use a new hydra.run.dir"
            )
        model = self.new_model(slot)
        model.load_slot_state_dict(payload["state"])
        return model.eval()

    def is_trained(self, slot: int) -> bool:
        path = self.checkpoint_path(slot)
        if not path.exists():
            return False
        # mmap: only the fingerprint is read, not the slot's tensors (hundreds of MB for PaDiM)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["fingerprint"] == self.fingerprint

    # -- training ----------------------------------------------------------------------------
    def train_all(self, images: torch.Tensor, on_slot: Callable[[int, int, str], None] | None = None) -> int:
        """Fit every slot not trained yet; returns the peak memory of any one slot's training."""
        peak = 0
        for slot in range(len(self.slots)):
            if self.is_trained(slot):
                if on_slot:
                    on_slot(slot, len(self.slots), "resumed")
                continue
            with PeakMemory(self.device) as memory:
                model = self.fit_slot(slot, images)
                self.save(slot, model)
                del model
                self.release()
            peak = max(peak, memory.bytes)
            if on_slot:
                on_slot(slot, len(self.slots), "trained")
        return peak

    def fit_slot(self, slot: int, images: torch.Tensor) -> AnomalyModule:
        model = self.new_model(slot).to(self.device)
        batch_size = int(self.cfg.model.batch_size)
        whole_image = str(self.cfg.get("inference", {}).get("features", "per_tile")) == "whole_image"
        if whole_image and not (model.backbone_features and getattr(model, "cache_embeddings", True)):
            raise ConfigError(f"model={self.cfg.model.name} does not support inference.features=whole_image; use per_tile")
        if getattr(model, "cache_embeddings", True):
            # Frozen features are computed once per tile, not once per epoch.
            parts = self.whole_image_embeddings(model, slot, images) if whole_image else [
                model.embed_features(run_backbone(self.backbone, tiles.to(self.device), chunk_pixels(self.cfg)))
                if model.backbone_features else model.embed(tiles.to(self.device))
                for _, tiles in iter_tile_batches(images, self.grid, self.slots[slot], batch_size)
            ]
            parts = [p if isinstance(p, tuple) else (p,) for p in parts]
            dataset = TensorDataset(*(torch.cat([p[i].cpu() for p in parts]) for i in range(len(parts[0]))))
            del parts
        else:
            dataset = LazyTiles(images, self.grid, self.slots[slot])
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=model.trainable, drop_last=False)
        trainer = L.Trainer(
            max_epochs=int(self.cfg.model.max_epochs), max_steps=int(self.cfg.model.max_steps), **self.trainer_kwargs
        )
        trainer.fit(model, loader)
        return model.cpu().eval()

    def whole_image_embeddings(self, model: AnomalyModule, slot: int, images: torch.Tensor) -> list:
        """The slot's tile embeddings from features cut out of the backbone run once on each whole
        image: the features inference sees with ``inference.features=whole_image``."""
        tiles, reductions = self.slots[slot], self.backbone.reductions
        stages = self.whole_image_stages(images)
        per_batch = max(1, int(self.cfg.model.batch_size) // len(tiles))
        parts = [
            model.embed_features(cut_tile_features([s[i : i + per_batch].to(self.device) for s in stages], self.grid, tiles, reductions))
            for i in range(0, len(images), per_batch)
        ]
        if slot == len(self.slots) - 1:
            self._whole_stages = None  # the last slot: free the training images' stages
        return parts

    def whole_image_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Backbone stages of every whole training image, computed once per run and kept in host
        memory (every slot cuts its tiles from them): ~2.7 MB per 512 px image for Lite0 [1, 2, 3]."""
        if getattr(self, "_whole_stages", None) is None or self._whole_stages[0] is not images:
            check_whole_image(self.grid, self.backbone)
            self.backbone.to(self.device)
            per_batch = max(1, int(self.cfg.model.batch_size) // self.grid.num_tiles)
            parts = [[f.cpu() for f in whole_image_features(self.backbone, images[i : i + per_batch], self.grid, self.device, chunk_pixels(self.cfg))]
                     for i in range(0, len(images), per_batch)]
            self._whole_stages = (images, [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))])
        return self._whole_stages[1]

    def release(self) -> None:
        """Give freed accelerator memory back so the next slot starts clean."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
