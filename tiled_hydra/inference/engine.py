"""THE inference engine: uint8 images -> merged full-resolution maps and image scores of a trained run.

One code path for the run's evaluation, the latency/throughput protocol (:mod:`tiled_hydra.inference.latency`)
and ``python -m tiled_hydra.predict``: tiling, every slot's model on its tiles, accumulation of
the tile maps, division by the coverage, seam smoothing and the image-score merge.

Two choices (``inference:`` in conf/config.yaml):

``mode``
    ``sequential`` (default, the paper's memory-first mode): one slot's model resident at a time.
    The slots are the outer loop; each slot is obtained once per :meth:`InferenceEngine.predict`
    call and predicts every image of every split handed to that call (the run passes its
    validation and test splits together, so every checkpoint is read once).
    ``resident``: every slot's model stays on the device; the frozen backbone runs once per batch
    over the tiles of every slot together, then each slot's head processes its own tiles' features.
    Memory rises by the slots' own weights (:meth:`SlotModels.weight_bytes`).

``features``
    ``per_tile`` (default): the backbone sees each tile on its own, zero-padded at the image border.
    ``whole_image``: the backbone runs once on the whole (padded) image and each tile's feature
    maps are cut from it, so overlapping tiles do not compute their overlap again. Features near
    tile borders then carry context from outside the tile, so training must use the same choice
    (it is part of the slot fingerprint). Needs tile and stride to be multiples of the backbone's
    largest reduction, and a model with ``backbone_features``.

Device policy: the backbone is moved to ``device`` once. In ``sequential`` mode a slot's own
weights go to the device for its tiles and leave it afterwards (on CPU nothing moves); in
``resident`` mode they all go once. Maps are accumulated in host memory.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from tiled_hydra.core.calibration import SlotCalibration, tile_window
from tiled_hydra.core.features import TileFeatures, chunks
from tiled_hydra.core.memory import PeakMemory
from tiled_hydra.core.merge import MergeSettings, merge_scores, smooth_seams
from tiled_hydra.core.tiling import TileGrid
from tiled_hydra.errors import ConfigError
from tiled_hydra.models.base import AnomalyModule

MODES = ("sequential", "resident")


class Prediction(NamedTuple):
    maps: torch.Tensor  # float32 (N, H, W) at the setup's image size, host memory
    scores: torch.Tensor  # float32 (N,)


@dataclass(frozen=True)
class InferenceSettings:
    mode: str = "sequential"
    batch_size: int = 32  # tiles per batch of a slot's head (the model's batch_size)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference.mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.batch_size < 1:
            raise ConfigError(f"model.batch_size must be >= 1, got {self.batch_size}")


class SlotModels:
    """Slot k's model on demand: read from its checkpoint every time it is asked for (``keep=False``:
    nothing stays in memory between calls), or read once and kept in host memory (``keep=True``:
    the speed protocol and ``predict``, where reading checkpoints is not inference)."""

    def __init__(self, load: Callable[[int], AnomalyModule], count: int, keep: bool):
        self.load, self.count, self.keep = load, count, keep
        self._kept: dict[int, AnomalyModule] = {}

    def __len__(self) -> int:
        return self.count

    def get(self, slot: int) -> AnomalyModule:
        if slot in self._kept:
            return self._kept[slot]
        model = self.load(slot)
        if self.keep:
            self._kept[slot] = model
        return model


def move_slot_weights(model: AnomalyModule, device: torch.device) -> None:
    """Move a slot's own weights; the shared frozen backbone stays where it is."""
    backbone = model._modules.pop("backbone")
    try:
        model.to(device)
    finally:
        model._modules["backbone"] = backbone


class InferenceEngine:
    """Merged predictions of a trained run for batches of uint8 images (see module doc)."""

    def __init__(self, grid: TileGrid, slots: list[list[int]], models: SlotModels, features: TileFeatures,
                 merge: MergeSettings, device: torch.device, settings: InferenceSettings, progress: bool = False):
        self.grid, self.slots, self.models, self.features = grid, slots, models, features
        self.merge, self.device, self.settings, self.progress = merge, device, settings, progress
        self.window = tile_window(grid.tile_size, merge.window)  # None: the flat mean
        self.coverage = grid.coverage(self.window)
        features.backbone.to(device)
        self.peak_bytes = 0  # peak memory of the model passes of the last predict call

    # -- public ----------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor) -> Prediction:
        """One inference step on a batch of uint8 images (N, 3, H, W) at the setup's image size
        (no memory sampling: the speed protocol times this)."""
        return self.predict(images, measure_memory=False)[0]

    @torch.no_grad()
    def predict(self, *splits: torch.Tensor, measure_memory: bool = True) -> list[Prediction]:
        """Predictions of several uint8 image tensors, every slot obtained once for all of them;
        ``peak_bytes`` is then the peak memory of the model passes."""
        map_sums = [torch.zeros(len(images), *self.grid.image_size) for images in splits]
        tile_scores = [torch.zeros(len(images), self.grid.num_tiles) for images in splits]
        # The result buffers exist before the measurement starts: they hold results (4 B per
        # image pixel on CPU, host memory on CUDA), not the cost of the model passes.
        with PeakMemory(self.device) if measure_memory else nullcontext() as memory:
            if self.settings.mode == "sequential":
                self._sequential(splits, map_sums, tile_scores)
            else:
                self._resident(splits, map_sums, tile_scores)
        self.peak_bytes = memory.bytes if measure_memory else 0
        return [self._merge(m, s) for m, s in zip(map_sums, tile_scores)]

    # -- the two modes ------------------------------------------------------------------------------
    def _sequential(self, splits, map_sums, tile_scores) -> None:
        if self.features.whole_image:
            for images in splits:  # every image's stages once, before the first slot cuts from them
                self.features.held_stages(images)
        bar = tqdm(self.slots, desc="predict", unit="slot", disable=not self.progress or len(self.slots) == 1,
                   file=sys.stdout, leave=False)
        for slot, tiles in enumerate(bar):
            model = self._to_device(self.models.get(slot))
            check_features(model, self.features)
            for i, images in enumerate(splits):
                for chunk in chunks(len(images), self.settings.batch_size // len(tiles)):
                    maps, scores = self.features.predict(model, images, chunk, tiles)
                    self._accumulate(map_sums[i], tile_scores[i], chunk, tiles, maps, scores, model)
            self._off_device(model)
            del model
            if not self.models.keep:
                # A LightningModule sits in reference cycles: without a collection its memory-mapped
                # weights stay mapped (and resident) beside the next slot's, and the peak grows with the slots.
                gc.collect()
        self.features.release()

    def _resident(self, splits, map_sums, tile_scores) -> None:
        models = [self._to_device(self.models.get(slot)) for slot in range(len(self.slots))]
        for model in models:
            check_features(model, self.features)
        shared = all(m.backbone_features for m in models)
        every_tile = list(range(self.grid.num_tiles))
        # Each slot's head gets about batch_size tiles per call, as in sequential mode: a head
        # called on a few tiles re-reads all its weights for them (PaDiM: 164 MB per ENS9 slot).
        per_chunk = self.settings.batch_size // max(len(t) for t in self.slots)
        for i, images in enumerate(splits):
            for chunk in chunks(len(images), per_chunk):
                if self.features.whole_image or shared:
                    # One backbone call for the tiles of every slot, not one call per slot.
                    features, tiles = self.features.of_tiles(images, chunk, every_tile, hold=False), None
                else:
                    features, tiles = None, self.features.pixels(images, chunk, every_tile)
                n = chunk.stop - chunk.start
                for model, slot_tiles in zip(models, self.slots):
                    rows = (torch.arange(n).unsqueeze(1) * self.grid.num_tiles + torch.tensor(slot_tiles)).flatten()
                    if features is not None:
                        own = [f if len(slot_tiles) == self.grid.num_tiles else f.index_select(0, rows.to(f.device)) for f in features]
                        maps, scores = model.predict_features(own, self.grid.tile_size)
                    else:
                        maps, scores = model.predict_tiles(tiles.index_select(0, rows.to(tiles.device)))
                    self._accumulate(map_sums[i], tile_scores[i], chunk, slot_tiles, maps, scores, model)
                del features
        for model in models:
            self._off_device(model)

    # -- pieces ----------------------------------------------------------------------------------------
    def _accumulate(self, map_sum, tile_scores, chunk, tiles, maps, scores, model) -> None:
        """Add a slot's tile maps (calibrated, window-weighted) and scores to the image buffers."""
        maps, scores = maps.float().cpu(), scores.float().cpu()
        if self.merge.calibration != "none":
            maps, scores = slot_calibration(model).apply(maps, scores, self.merge.calibration)
        maps = maps.view(-1, len(tiles), *maps.shape[-2:])
        scores = scores.view(-1, len(tiles))
        for k, tile in enumerate(tiles):
            self.grid.add_tile(map_sum[chunk], maps[:, k] if self.window is None else maps[:, k] * self.window, tile)
            tile_scores[chunk, tile] = scores[:, k]

    def _merge(self, map_sum: torch.Tensor, tile_scores: torch.Tensor) -> Prediction:
        maps = map_sum.div_(self.coverage)
        if self.merge.seam_smoothing:
            maps = smooth_seams(maps, self.grid, sigma=self.merge.sigma, width_fraction=self.merge.width_fraction)
        return Prediction(maps, merge_scores(tile_scores, self.merge.score))

    def _to_device(self, model: AnomalyModule) -> AnomalyModule:
        if self.device.type != "cpu":
            move_slot_weights(model, self.device)
        return model

    def _off_device(self, model: AnomalyModule) -> None:
        if self.device.type == "cuda":
            move_slot_weights(model, torch.device("cpu"))
            torch.cuda.empty_cache()  # the next slot starts clean


def slot_calibration(model: AnomalyModule) -> SlotCalibration:
    calibration = getattr(model, "calibration", None)
    if calibration is None:
        raise ConfigError("merge.calibration needs slots trained by this version (their checkpoints hold the "
                          "calibration statistics); retrain, or use merge.calibration=none")
    return calibration


def check_features(model: AnomalyModule, features: TileFeatures) -> None:
    if features.whole_image and not model.backbone_features:
        raise ConfigError(f"model {type(model).__name__} does not take backbone features: use inference.features=per_tile")
