"""THE inference engine: uint8 images -> merged full-resolution maps and image scores of a trained run.

One code path for the run's evaluation, the latency/throughput protocol (:mod:`tiled_hydra.latency`)
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

import dataclasses
import gc
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from omegaconf import DictConfig

from tiled_hydra.backbone import FrozenBackbone
from tiled_hydra.errors import ConfigError
from tiled_hydra.memory import PeakMemory
from tiled_hydra.merge import merge_scores, smooth_seams
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.tiling import TileGrid

MODES = ("sequential", "resident")
FEATURES = ("per_tile", "whole_image")


class Prediction(NamedTuple):
    maps: torch.Tensor  # float32 (N, H, W) at the setup's image size, host memory
    scores: torch.Tensor  # float32 (N,)


#: Pixels per backbone call when inference.backbone_chunk_pixels is not set (two 256 px tiles).
DEFAULT_CHUNK_PIXELS = 2 * 256 * 256


@dataclass(frozen=True)
class InferenceSettings:
    mode: str = "sequential"
    features: str = "per_tile"
    batch_size: int = 32  # tiles per batch of a slot's head (the model's batch_size)
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS  # pixels per backbone call (see run_backbone)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference.mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.features not in FEATURES:
            raise ConfigError(f"inference.features={self.features!r}: choose one of {', '.join(FEATURES)}")
        if self.batch_size < 1:
            raise ConfigError(f"model.batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_pixels < 1:
            raise ConfigError(f"inference.backbone_chunk_pixels must be >= 1, got {self.chunk_pixels}")

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "InferenceSettings":
        inference = cfg.get("inference") or {}
        return cls(str(inference.get("mode", "sequential")), str(inference.get("features", "per_tile")), int(cfg.model.batch_size),
                   chunk_pixels(cfg))


def chunk_pixels(cfg: DictConfig) -> int:
    return int((cfg.get("inference") or {}).get("backbone_chunk_pixels", DEFAULT_CHUNK_PIXELS))


def run_backbone(backbone: FrozenBackbone, images: torch.Tensor, max_pixels: int) -> list[torch.Tensor]:
    """The backbone's stages of a batch, computed a few images at a time (at most ``max_pixels`` per call).

    Why: a convolution network's activations grow with the batch; at 32 tiles of 256 px
    EfficientNet-Lite0's largest ones are ~200 MB. glibc serves allocations above 32 MB with a
    fresh mmap and returns them on free, so every batch page-faulted ~3 GB of new zeroed memory
    (half of the CPU time went to the kernel). Below that size freed memory is reused. The
    stages are the same per image (eval mode), only float rounding of the convolutions may differ.
    """
    per_call = max(1, max_pixels // (images.shape[-2] * images.shape[-1]))
    if len(images) <= per_call:
        return backbone(images)
    out: list[torch.Tensor] = []
    for start in range(0, len(images), per_call):
        stages = backbone(images[start : start + per_call])
        if not out:
            out = [s.new_empty(len(images), *s.shape[1:]) for s in stages]
        for buffer, stage in zip(out, stages):
            buffer[start : start + len(stage)] = stage
        del stages
    return out


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

    def weight_bytes(self) -> int:
        """Bytes of every slot's own weights (backbone excluded): what ``resident`` mode adds."""
        return sum(sum(t.numel() * t.element_size() for t in self.get(s).slot_state_dict().values()) for s in range(self.count))


def move_slot_weights(model: AnomalyModule, device: torch.device) -> None:
    """Move a slot's own weights; the shared frozen backbone stays where it is."""
    backbone = model._modules.pop("backbone")
    try:
        model.to(device)
    finally:
        model._modules["backbone"] = backbone


def as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


def check_whole_image(grid: TileGrid, backbone: FrozenBackbone) -> int:
    """The largest backbone reduction, once tile and stride are checked to be multiples of it."""
    reduction = max(backbone.reductions)
    for what, size in (("tile_size", grid.tile_size), ("stride", grid.stride)):
        if any(v % reduction for v in size):
            raise ConfigError(
                f"inference.features=whole_image needs setup.{what} {list(size)} to be a multiple of the backbone's "
                f"reduction {reduction}; change setup.{what} or use inference.features=per_tile"
            )
    return reduction


def whole_image_features(backbone: FrozenBackbone, images: torch.Tensor, grid: TileGrid, device: torch.device,
                         max_pixels: int = DEFAULT_CHUNK_PIXELS) -> list[torch.Tensor]:
    """Backbone stages of whole uint8 images, zero-padded to the grid's padded size as tiling does."""
    (h, w), (ph, pw) = grid.image_size, grid.padded_size
    padded = F.pad(as_unit_float(images.to(device)), (0, pw - w, 0, ph - h))
    return run_backbone(backbone, padded, max_pixels)


def cut_tile_features(features: Sequence[torch.Tensor], grid: TileGrid, tiles: Sequence[int], reductions: Sequence[int]) -> list[torch.Tensor]:
    """Whole-image stages (B, C, Hp / r, Wp / r) -> the stages of ``tiles``, image-major (B * len(tiles), C, th / r, tw / r)."""
    out = []
    for stage, r in zip(features, reductions):
        crops = []
        for tile in tiles:
            rows, cols = grid.window(tile)
            crops.append(stage[:, :, rows.start // r : rows.stop // r, cols.start // r : cols.stop // r])
        out.append(torch.stack(crops, dim=1).flatten(0, 1))
    return out


class InferenceEngine:
    """Merged predictions of a trained run for batches of uint8 images (see module doc)."""

    def __init__(self, grid: TileGrid, slots: list[list[int]], models: SlotModels, backbone: FrozenBackbone,
                 merge_cfg: DictConfig, device: torch.device, settings: InferenceSettings):
        self.grid, self.slots, self.models, self.backbone = grid, slots, models, backbone
        self.merge_cfg, self.device, self.settings = merge_cfg, device, settings
        self.coverage = grid.coverage()
        self.reductions = list(backbone.reductions)
        if settings.features == "whole_image":
            check_whole_image(grid, backbone)
        backbone.to(device)
        self.peak_bytes = 0  # peak memory of the model passes of the last predict call
        self.progress = False  # a bar over slots while predicting (the run sets it from cfg.progress)

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
        whole = self.settings.features == "whole_image"
        cached = [self._whole_features_host(images) for images in splits] if whole else None
        bar = tqdm(self.slots, desc="predict", unit="slot", disable=not self.progress or len(self.slots) == 1,
                   file=sys.stdout, leave=False)
        for slot, tiles in enumerate(bar):
            model = self._to_device(self.models.get(slot))
            check_features(model, self.settings)
            for i, images in enumerate(splits):
                for chunk in self._chunks(len(images), self.settings.batch_size // len(tiles)):
                    if whole:
                        features = cut_tile_features([f[chunk].to(self.device) for f in cached[i]], self.grid, tiles, self.reductions)
                        maps, scores = model.predict_features(features, self.grid.tile_size)
                    else:
                        batch = as_unit_float(self.grid.tile_subset(images[chunk], tiles).flatten(0, 1).to(self.device))
                        if model.backbone_features:
                            features = run_backbone(self.backbone, batch, self.settings.chunk_pixels)
                            maps, scores = model.predict_features(features, self.grid.tile_size)
                        else:
                            maps, scores = model.predict_tiles(batch)
                    self._accumulate(map_sums[i], tile_scores[i], chunk, tiles, maps, scores)
            self._off_device(model)
            del model
            if not self.models.keep:
                # A LightningModule sits in reference cycles: without a collection its memory-mapped
                # weights stay mapped (and resident) beside the next slot's, and the peak grows with the slots.
                gc.collect()

    def _resident(self, splits, map_sums, tile_scores) -> None:
        models = [self._to_device(self.models.get(slot)) for slot in range(len(self.slots))]
        for model in models:
            check_features(model, self.settings)
        shared = all(m.backbone_features for m in models)
        every_tile = list(range(self.grid.num_tiles))
        # Each slot's head gets about batch_size tiles per call, as in sequential mode: a head
        # called on a few tiles re-reads all its weights for them (PaDiM: 164 MB per ENS9 slot).
        per_chunk = self.settings.batch_size // max(len(t) for t in self.slots)
        for i, images in enumerate(splits):
            for chunk in self._chunks(len(images), per_chunk):
                if self.settings.features == "whole_image":
                    whole = whole_image_features(self.backbone, images[chunk], self.grid, self.device, self.settings.chunk_pixels)
                    features = cut_tile_features(whole, self.grid, every_tile, self.reductions)
                    del whole
                else:
                    tiles = as_unit_float(self.grid.tile_subset(images[chunk], every_tile).flatten(0, 1).to(self.device))
                    # One backbone call for the tiles of every slot, not one call per slot.
                    features = run_backbone(self.backbone, tiles, self.settings.chunk_pixels) if shared else None
                n = chunk.stop - chunk.start
                for model, slot_tiles in zip(models, self.slots):
                    rows = (torch.arange(n).unsqueeze(1) * self.grid.num_tiles + torch.tensor(slot_tiles)).flatten()
                    if features is not None:
                        own = [f if len(slot_tiles) == self.grid.num_tiles else f.index_select(0, rows.to(f.device)) for f in features]
                        maps, scores = model.predict_features(own, self.grid.tile_size)
                    else:
                        maps, scores = model.predict_tiles(tiles.index_select(0, rows.to(tiles.device)))
                    self._accumulate(map_sums[i], tile_scores[i], chunk, slot_tiles, maps, scores)
                del features
        for model in models:
            self._off_device(model)

    # -- pieces ----------------------------------------------------------------------------------------
    @staticmethod
    def _chunks(count: int, per_chunk: int):
        per_chunk = max(1, per_chunk)
        for start in range(0, count, per_chunk):
            yield slice(start, min(start + per_chunk, count))

    def _whole_features_host(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Whole-image stages of every image, computed once (in batches) and held in host memory."""
        per_chunk = max(1, self.settings.batch_size // self.grid.num_tiles)
        parts = [[f.cpu() for f in whole_image_features(self.backbone, images[c], self.grid, self.device, self.settings.chunk_pixels)]
                 for c in self._chunks(len(images), per_chunk)]
        if not parts:
            return [torch.empty(0)] * len(self.reductions)
        return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]

    def _accumulate(self, map_sum, tile_scores, chunk, tiles, maps, scores) -> None:
        maps = maps.float().cpu().view(-1, len(tiles), *maps.shape[-2:])
        scores = scores.float().cpu().view(-1, len(tiles))
        for k, tile in enumerate(tiles):
            self.grid.add_tile(map_sum[chunk], maps[:, k], tile)
            tile_scores[chunk, tile] = scores[:, k]

    def _merge(self, map_sum: torch.Tensor, tile_scores: torch.Tensor) -> Prediction:
        maps = map_sum.div_(self.coverage)
        smoothing = self.merge_cfg.seam_smoothing
        if smoothing.enabled:
            maps = smooth_seams(maps, self.grid, sigma=float(smoothing.sigma), width_fraction=float(smoothing.width_fraction))
        return Prediction(maps, merge_scores(tile_scores, self.merge_cfg.score))

    def _to_device(self, model: AnomalyModule) -> AnomalyModule:
        if self.device.type != "cpu":
            move_slot_weights(model, self.device)
        return model

    def _off_device(self, model: AnomalyModule) -> None:
        if self.device.type == "cuda":
            move_slot_weights(model, torch.device("cpu"))
            torch.cuda.empty_cache()  # the next slot starts clean


def check_features(model: AnomalyModule, settings: InferenceSettings) -> None:
    if settings.features == "whole_image" and not model.backbone_features:
        raise ConfigError(f"model {type(model).__name__} does not take backbone features: use inference.features=per_tile")


def engine_for(runner, cfg: DictConfig, keep: bool, mode: str | None = None) -> InferenceEngine:
    """The engine of a :class:`~tiled_hydra.ensemble.SlotRunner`'s trained slots, as ``cfg.inference`` says
    (``mode`` overrides ``inference.mode``: it changes how, not what, is computed)."""
    settings = InferenceSettings.from_cfg(cfg)
    if mode is not None:
        settings = dataclasses.replace(settings, mode=mode)
    models = SlotModels(runner.load, len(runner.slots), keep)
    return InferenceEngine(runner.grid, runner.slots, models, runner.backbone, cfg.merge, runner.device, settings)


def slot_weight_bytes(checkpoint_dir) -> int:
    """Bytes of every slot's own weights in ``checkpoint_dir`` (what ``resident`` mode keeps on the device)."""
    from pathlib import Path

    total = 0
    for path in sorted(Path(checkpoint_dir).glob("slot_*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"]  # mmap: sizes only
        total += sum(t.numel() * t.element_size() for t in state.values())
    return total
