"""Train one model per slot, one slot after another (prediction: :mod:`tiled_hydra.inference`).

A *slot* is a model together with the tile locations it serves: a tiled ensemble has
one slot per location, a shared-tile setup one slot for all locations (tiles stacked
batch-wise), a single model a 1x1 grid.  Only one slot is ever resident on the
accelerator; trained slots live in per-slot checkpoints on disk, which also make an
interrupted run resumable.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from tiled_hydra.backbone import FrozenBackbone
from tiled_hydra.errors import ConfigError, DataError, instantiate_checked
from tiled_hydra.inference import check_whole_image, chunk_pixels, cut_tile_features, run_backbone, whole_image_features
from tiled_hydra.memory import PeakMemory
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.rundir import PidLock, check_slot_records, fingerprint_of, mismatch_error, slot_identity, temp_path, write_json_atomic
from tiled_hydra.tiling import TileGrid

log = logging.getLogger(__name__)

# Lightning announces its accelerator and tips at INFO on every Trainer, i.e. once per slot.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
# Expected for every slot, so not worth a warning each time: the frozen backbone is in eval
# mode on purpose, and statistics-only models (PaDiM, PatchCore) have no optimizer.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
# Lightning says "`LightningModule.configure_optimizers` returned `None`, ...".
warnings.filterwarnings("ignore", message=".*configure_optimizers` returned `None`")
# Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated torch API, once per process.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")


def slot_tiles(grid: TileGrid, shared: bool) -> list[list[int]]:
    """Tile indices served by each slot: all tiles in one slot, or one slot per tile."""
    tiles = list(range(grid.num_tiles))
    return [tiles] if shared else [[t] for t in tiles]


def shard_slots(num_slots: int, shard: int | None, num_shards: int) -> list[int]:
    """The slots one shard trains: slot k belongs to shard k mod num_shards (interleaved, so slots of
    unequal cost, e.g. border tiles, spread evenly); every slot when no shard is chosen."""
    slots = range(num_slots)
    return list(slots) if shard is None else [k for k in slots if k % num_shards == shard]


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


def show_progress(setting) -> bool:
    """progress: true | false | auto (auto: only when stdout is a terminal, never in log files)."""
    return setting is True or (setting in (None, "auto") and sys.stdout.isatty())


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
        self.identity = slot_identity(self.cfg)  # of the weights: merge, metrics and speed settings may differ
        self.fingerprint = fingerprint_of(self.identity)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.progress = show_progress(self.cfg.get("progress", "auto"))
        check_slot_records(self.checkpoint_dir, self.identity)

    # -- construction and checkpoints ----------------------------------------------------
    def new_model(self, slot: int) -> AnomalyModule:
        # Seeding per slot makes a resumed run identical to an uninterrupted one.
        L.seed_everything(int(self.cfg.seed) + slot, workers=True, verbose=False)
        return instantiate_checked(self.cfg.model.net, backbone=self.backbone)

    def checkpoint_path(self, slot: int) -> Path:
        return self.checkpoint_dir / f"slot_{slot:03d}.pt"

    def record_path(self, slot: int) -> Path:
        return self.checkpoint_dir / f"slot_{slot:03d}.json"

    def read_record(self, slot: int) -> dict | None:
        path = self.record_path(slot)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a damaged record: the slot is trained again (its checkpoint is moved aside)

    def save(self, slot: int, model: AnomalyModule, record: dict) -> dict:
        """Checkpoint, then its record (seconds, peak memory, size, checksum): both atomic."""
        path = self.checkpoint_path(slot)
        tmp = temp_path(path)  # unique: two processes never share a temporary file
        try:
            torch.save({"fingerprint": self.fingerprint, "tiles": self.slots[slot], "state": model.slot_state_dict()}, tmp)
            record |= {"checkpoint_bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        record = {"fingerprint": self.fingerprint, "slot": slot, "tiles": self.slots[slot], **record, "identity": self.identity}
        write_json_atomic(self.record_path(slot), record)
        return record

    def load(self, slot: int) -> AnomalyModule:
        path = self.checkpoint_path(slot)
        try:
            # mmap: the slot's tensors are the file's pages (assigned, not copied into fresh buffers)
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"{path} cannot be read ({reason}); delete it to retrain that slot") from None
        if payload.get("fingerprint") != self.fingerprint:
            raise mismatch_error(path, self.checkpoint_dir.parent, None, self.identity)
        model = self.new_model(slot)
        model.load_slot_state_dict(payload["state"])
        return model.eval()

    def trained_record(self, slot: int) -> dict | None:
        """The record of a slot trained earlier whose checkpoint is intact, else None.

        A checkpoint whose size or checksum differs from its record (truncated, overwritten)
        is moved aside with a warning and the slot is trained again.
        """
        path, record = self.checkpoint_path(slot), self.read_record(slot)
        if record is None or record.get("fingerprint") != self.fingerprint:
            return None
        if not path.exists():
            return None
        if path.stat().st_size != record.get("checkpoint_bytes") or file_sha256(path) != record.get("sha256"):
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            log.warning("%s is damaged (size or checksum differ from %s); moved to %s, training that slot again",
                        path, self.record_path(slot).name, aside.name)
            return None
        return record

    # -- training ----------------------------------------------------------------------------
    def train_all(self, images: torch.Tensor, on_slot: Callable[[int, int, str], None] | None = None,
                  slots: list[int] | None = None, shard: int | None = None) -> list[dict]:
        """Fit every slot of ``slots`` (default: all) not trained yet; returns their records, with
        ``resumed`` set for the slots found on disk (their seconds and peak memory are those measured
        when they were trained, by this process or another shard)."""
        slots = list(range(len(self.slots))) if slots is None else slots
        records = []
        with tqdm(total=len(slots), desc="slots", unit="slot", disable=not self.progress, position=0,
                  file=sys.stdout) as bar:  # stdout, as Lightning's step bar below it
            for slot in slots:
                with self.slot_lock(slot):  # another process training this slot finishes it first
                    record = self.trained_record(slot)
                    if record is not None:
                        records.append({**record, "resumed": True})
                        if on_slot:
                            on_slot(slot, len(self.slots), "resumed")
                        bar.update()
                        continue
                    record = self.train_slot(slot, images, shard)
                records.append({**record, "resumed": False})
                if on_slot:
                    on_slot(slot, len(self.slots), "trained")
                bar.update()
        return records

    def train_slot(self, slot: int, images: torch.Tensor, shard: int | None) -> dict:
        losses = LossRecorder()
        started = time.time()
        start = time.perf_counter()
        with PeakMemory(self.device) as memory:
            model = self.fit_slot(slot, images, callbacks=[losses])
        seconds = time.perf_counter() - start
        record = self.save(slot, model, {
            "seconds": round(seconds, 3), "peak_mem_bytes": int(memory.bytes), "mem_kind": memory.kind,
            "losses": losses.losses,
            # when and where: the run's wall time spans every shard's slots (summarize)
            "started": round(started, 3), "finished": round(time.time(), 3), "shard": shard,
            "host": socket.gethostname(), "pid": os.getpid(),
        })
        del model
        self.release()
        return record

    def missing_slots(self) -> list[int]:
        """Slots without a record and checkpoint of this configuration (a quick look: the checksum
        is verified when a slot is used, by :meth:`trained_record`)."""
        return [slot for slot in range(len(self.slots))
                if (self.read_record(slot) or {}).get("fingerprint") != self.fingerprint or not self.checkpoint_path(slot).exists()]

    def slot_lock(self, slot: int):
        """An exclusive lock on checkpoints/slot_NNN.lock while a slot is checked and trained: two
        shards (or a shard and a whole run) sharing a checkpoint directory never train one slot twice."""
        return SlotLock(self.checkpoint_dir / f"slot_{slot:03d}.lock")

    def fit_slot(self, slot: int, images: torch.Tensor, callbacks: list | None = None) -> AnomalyModule:
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
        dataset = model.split_training_data(dataset)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=model.trainable, drop_last=False)
        callbacks = list(callbacks or [])
        kwargs = dict(self.trainer_kwargs)
        if self.progress and model.trainable:
            callbacks.append(SlotProgressBar(f"slot {slot + 1}/{len(self.slots)}"))
            kwargs["enable_progress_bar"] = True
        else:
            kwargs["enable_progress_bar"] = False
        trainer = L.Trainer(
            max_epochs=int(self.cfg.model.max_epochs), max_steps=int(self.cfg.model.max_steps), callbacks=callbacks, **kwargs
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
        # A LightningModule sits in reference cycles: ``del model`` alone leaves its tensors alive
        # until the cyclic GC runs, so the next slot would load beside the previous one.
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def delete_checkpoints(self) -> int:
        """Remove the slot checkpoints (keep_checkpoints=false); the slot records stay. Returns bytes freed."""
        freed = 0
        for slot in range(len(self.slots)):
            path = self.checkpoint_path(slot)
            if path.exists():
                freed += path.stat().st_size
                path.unlink()
        return freed


class SlotLock(PidLock):
    """slot_NNN.lock next to the slot's checkpoint: waits (saying so) while another process trains it."""

    def __init__(self, path: Path):
        def wait(pid: str) -> None:
            log.info("%s: another process (pid %s) is training this slot; waiting for it", path.with_suffix(".pt").name, pid)

        super().__init__(path, wait)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def summarize(records: list[dict]) -> dict:
    """Run-level training costs from the slot records: every slot counts, resumed or not, whichever
    shard trained it.  ``train_seconds`` sums the slots' own times; ``train_wall_seconds`` runs from
    the first slot's start to the last slot's end (parallel shards: less than the sum; a resumed
    run: includes the pause)."""
    timed = [r for r in records if "started" in r and "finished" in r]
    return {
        "train_seconds": round(sum(r["seconds"] for r in records), 3),
        "train_wall_seconds": round(max(r["finished"] for r in timed) - min(r["started"] for r in timed), 3) if timed else None,
        "train_peak_mem_bytes": max(int(r["peak_mem_bytes"]) for r in records),
        "resumed_slots": sum(bool(r.get("resumed")) for r in records),
        "checkpoint_bytes": sum(int(r["checkpoint_bytes"]) for r in records),
        "train_shards": len({r.get("shard") for r in records}),
    }
