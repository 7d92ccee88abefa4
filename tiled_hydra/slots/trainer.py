"""Train one model per slot, one slot after another (prediction: :mod:`tiled_hydra.inference.engine`).

A *slot* is a model together with the tile locations it serves: a tiled ensemble has
one slot per location, a shared-tile setup one slot for all locations (tiles stacked
batch-wise), a single model a 1x1 grid. Only one slot is ever resident on the
accelerator; trained slots live in the :class:`~tiled_hydra.slots.store.SlotStore`,
which also makes an interrupted run resumable.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from tiled_hydra.core.calibration import SlotCalibration, fit_calibration
from tiled_hydra.core.features import TileFeatures, chunks
from tiled_hydra.core.memory import PeakMemory
from tiled_hydra.core.tiling import TileGrid
from tiled_hydra.errors import ConfigError, Interrupted, instantiate_checked
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.slots.cluster import node_name
from tiled_hydra.slots.store import SlotStore, slot_name

log = logging.getLogger("tiled_hydra")

#: Normal images a slot's calibration statistics are computed on, at most (they bound its time and memory).
MAX_CALIBRATION_IMAGES = 64

# Lightning announces its accelerator and tips at INFO on every Trainer, i.e. once per slot.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
# Expected for every slot, so not worth a warning each time: the frozen backbone is in eval
# mode on purpose, and statistics-only models (PaDiM, PatchCore) have no optimizer.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
# Lightning says "`LightningModule.configure_optimizers` returned `None`, ...".
warnings.filterwarnings("ignore", message=".*configure_optimizers` returned `None`")
# Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated torch API, once per process.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
# Lightning on a machine where SLURM's srun is installed, outside any SLURM job: not our case to warn about.
warnings.filterwarnings("ignore", message="The `srun` command is available")


@dataclass(frozen=True)
class ModelSpec:
    """What builds and trains one slot's model: ``model.*`` of the config."""

    name: str
    net: DictConfig  # the ``_target_`` node (model.net)
    batch_size: int
    max_epochs: int
    max_steps: int
    seed: int

    def build(self, backbone, slot: int) -> AnomalyModule:
        # Seeding per slot makes a resumed run identical to an uninterrupted one.
        L.seed_everything(self.seed + slot, workers=True, verbose=False)
        return instantiate_checked(self.net, backbone=backbone)


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


class LossRecorder(L.Callback):
    """Keeps every training step's loss, for the slot record (and its W&B curve)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(round(float(loss.detach()), 6))


class SlotProgressBar(TQDMProgressBar):
    """Lightning's bar over the training steps of one slot (its step budget, not one epoch of
    tiles: tiny slots have one batch per epoch), named after the slot, with the current loss."""

    def __init__(self, label: str):
        super().__init__(process_position=1, leave=False)
        self.label = label

    def on_train_epoch_start(self, trainer, *_) -> None:
        if trainer.max_steps <= 0:  # no step budget: Lightning's bar over the epoch's batches
            super().on_train_epoch_start(trainer)
        elif trainer.current_epoch == 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.set_description(self.label)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, trainer.max_steps):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def release_memory(device: torch.device) -> None:
    """Give freed memory back so the next slot starts clean."""
    # A LightningModule sits in reference cycles: ``del model`` alone leaves its tensors alive
    # until the cyclic GC runs, so the next slot would load beside the previous one.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SlotTrainer:
    """Fits the slots of one run into its :class:`SlotStore`, one slot at a time."""

    def __init__(self, store: SlotStore, grid: TileGrid, features: TileFeatures, spec: ModelSpec,
                 device: torch.device, trainer_kwargs: dict, progress: bool = False):
        self.store, self.grid, self.features, self.spec = store, grid, features, spec
        self.device, self.trainer_kwargs, self.progress = device, trainer_kwargs, progress

    @property
    def slots(self) -> list[list[int]]:
        return self.store.tiles

    def train(self, images: torch.Tensor, slots: list[int] | None = None, shard: int | None = None,
              on_slot: Callable[[int, dict], None] | None = None, calibration_images: torch.Tensor | None = None) -> list[dict]:
        """Fit every slot of ``slots`` (default: all) not trained yet; returns their records, with
        ``resumed`` set for the slots found on disk (their seconds and peak memory are those measured
        when they were trained, by this process or another shard). ``calibration_images``: normal
        images that are never test images (validation normals, else ``images``); each slot's output
        statistics on them are stored with it (core/calibration.py)."""
        calibration_images = images if calibration_images is None or len(calibration_images) == 0 else calibration_images
        slots = list(range(len(self.slots))) if slots is None else slots
        records = []
        with tqdm(total=len(slots), desc="slots", unit="slot", disable=not self.progress, position=0,
                  file=sys.stdout) as bar:  # stdout, as Lightning's step bar below it
            for done, slot in enumerate(slots, start=1):
                with self.store.lock(slot):  # another process training this slot finishes it first
                    record = self.store.trained_record(slot)
                    resumed = record is not None
                    if not resumed:
                        record = self.train_slot(slot, images, shard, calibration_images)
                records.append({**record, "resumed": resumed})
                log.info("%s %s%s (%d of %d in this job)", slot_name(slot), "found trained" if resumed else "trained",
                         "" if resumed else f" in {record['seconds']:.1f} s", done, len(slots))
                if on_slot:
                    on_slot(slot, records[-1])
                bar.update()
        self.features.release()
        return records

    def train_slot(self, slot: int, images: torch.Tensor, shard: int | None, calibration_images: torch.Tensor) -> dict:
        losses = LossRecorder()
        started = time.time()
        start = time.perf_counter()
        with PeakMemory(self.device) as memory:
            model = self.fit(slot, images, callbacks=[losses])
            calibration = self.calibrate(slot, model, calibration_images)
        seconds = time.perf_counter() - start
        record = self.store.save(slot, model, {
            "seconds": round(seconds, 3), "peak_mem_bytes": int(memory.bytes), "mem_kind": memory.kind,
            "losses": losses.losses,
            # when and where: the run's wall time spans every shard's slots (training_summary)
            "started": round(started, 3), "finished": round(time.time(), 3), "shard": shard,
            "host": socket.gethostname(), "node": node_name(), "pid": os.getpid(),
        }, calibration)
        del model
        release_memory(self.device)
        return record

    @torch.no_grad()
    def calibrate(self, slot: int, model: AnomalyModule, images: torch.Tensor) -> SlotCalibration:
        """Statistics of the fitted slot's tile maps and scores on its tiles of normal ``images``
        (at most MAX_CALIBRATION_IMAGES of them, the first ones)."""
        images, tiles = images[:MAX_CALIBRATION_IMAGES], self.slots[slot]
        model.to(self.device)
        maps, scores = [], []
        for chunk in chunks(len(images), self.spec.batch_size // len(tiles)):
            chunk_maps, chunk_scores = self.features.predict(model, images, chunk, tiles)
            maps.append(chunk_maps.float().cpu())
            scores.append(chunk_scores.float().cpu())
        model.cpu()
        return fit_calibration(torch.cat(maps), torch.cat(scores))

    def new_model(self, slot: int) -> AnomalyModule:
        return self.spec.build(self.features.backbone, slot)

    def fit(self, slot: int, images: torch.Tensor, callbacks: list | None = None) -> AnomalyModule:
        """A fitted model of ``slot`` on the CPU, in eval mode (not saved)."""
        model = self.new_model(slot).to(self.device)
        tiles = self.slots[slot]
        if self.features.whole_image and not (model.backbone_features and model.cache_embeddings):
            raise ConfigError(f"model={self.spec.name} does not support inference.features=whole_image; use per_tile")
        if model.cache_embeddings:
            # Frozen features are computed once per tile, not once per epoch.
            parts = [
                model.embed_features(self.features.of_tiles(images, chunk, tiles)) if model.backbone_features
                else model.embed(self.features.pixels(images, chunk, tiles))
                for chunk in chunks(len(images), self.spec.batch_size // len(tiles))
            ]
            parts = [p if isinstance(p, tuple) else (p,) for p in parts]
            dataset = TensorDataset(*(torch.cat([p[i].cpu() for p in parts]) for i in range(len(parts[0]))))
            del parts
        else:
            dataset = LazyTiles(images, self.grid, tiles)
        dataset = model.split_training_data(dataset)
        loader = DataLoader(dataset, batch_size=self.spec.batch_size, shuffle=model.trainable, drop_last=False)
        callbacks = list(callbacks or [])
        kwargs = dict(self.trainer_kwargs)
        kwargs["enable_progress_bar"] = self.progress and model.trainable
        if kwargs["enable_progress_bar"]:
            callbacks.append(SlotProgressBar(slot_name(slot)))
        trainer = L.Trainer(max_epochs=self.spec.max_epochs, max_steps=self.spec.max_steps, callbacks=callbacks, **kwargs)
        try:
            trainer.fit(model, loader)
        except SIGTERMException:
            # Lightning ends a fit on SIGTERM with a SystemExit without a code: exit status 0 for a run
            # that did not finish. Slots saved before this one stay; the same command resumes.
            raise Interrupted(f"{slot_name(slot)}: stopped by SIGTERM while training; the slots already saved "
                              "are kept, run the same command again to resume") from None
        return model.cpu().eval()
