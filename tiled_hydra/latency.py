"""Latency and throughput of the whole inference step, as the paper measures them (§4.1).

Protocol (EfficientAD's, followed by paper 000 and paper 003): untimed warm-up steps first,
then timed steps; latency at batch size 1 (mean time of one step), throughput at a larger batch
size (timed images / timed seconds).  ``warmup`` and ``repeats`` count *images* in both
measurements, so the throughput measurement costs about as much as the latency one.

The timed step is what a deployed tiled model does for a batch of uint8 images: input to the
device, uint8 -> float, tiling, every slot's model on its tiles, untiling (overlaps averaged),
seam smoothing, image score, maps and scores back in host memory.

Where the models live: each slot's model is read from its checkpoint once, before timing, and
kept in host memory -- reading checkpoints from disk is not inference.  On CPU nothing moves.
On CUDA a single slot (single model, shared-tile setups) stays on the device; with several slots
each slot's own weights are moved to the device for its tiles and back to host memory after, as
in the run (one slot resident at a time).  That transfer is part of the timed step: it is the
latency overhead of ENS4/ENS9 that the paper reports.  The frozen backbone is shared by all
slots and stays on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from tiled_hydra.ensemble import SlotRunner
from tiled_hydra.merge import merge_scores, smooth_seams
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.tiling import TileGrid


def move_slot_weights(model: AnomalyModule, device: torch.device) -> None:
    """Move a slot's own weights; the shared frozen backbone stays where it is."""
    backbone = model._modules.pop("backbone")
    try:
        model.to(device)
    finally:
        model._modules["backbone"] = backbone


class TiledInference:
    """One inference step over a batch of uint8 images with preloaded slot models."""

    def __init__(self, models: list[AnomalyModule], slots: list[list[int]], grid: TileGrid,
                 merge_cfg: DictConfig, device: torch.device):
        self.models, self.slots, self.grid, self.merge_cfg, self.device = models, slots, grid, merge_cfg, device
        self.coverage = grid.coverage().to(device)  # a constant of the grid, not per-image work
        self.swap = device.type == "cuda" and len(models) > 1
        models[0].backbone.to(device)
        if not self.swap:
            for model in models:
                model.to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images.to(self.device, non_blocking=True).float().div_(255)
        tiles = self.grid.tile(batch)  # (B, N, C, th, tw)
        n = len(images)
        map_sum = torch.zeros(n, *self.grid.image_size, device=self.device)
        tile_scores = torch.zeros(n, self.grid.num_tiles, device=self.device)
        for model, slot_tiles in zip(self.models, self.slots):
            if self.swap:
                move_slot_weights(model, self.device)
            maps, scores = model.predict_tiles(tiles[:, slot_tiles].flatten(0, 1))
            maps = maps.float().view(n, len(slot_tiles), *maps.shape[-2:])
            scores = scores.float().view(n, len(slot_tiles))
            for k, tile in enumerate(slot_tiles):
                self.grid.add_tile(map_sum, maps[:, k], tile)
                tile_scores[:, tile] = scores[:, k]
            if self.swap:
                move_slot_weights(model, torch.device("cpu"))
        maps = map_sum.div_(self.coverage)
        smoothing = self.merge_cfg.seam_smoothing
        if smoothing.enabled:
            maps = smooth_seams(maps, self.grid, sigma=float(smoothing.sigma), width_fraction=float(smoothing.width_fraction))
        return maps.cpu(), merge_scores(tile_scores, self.merge_cfg.score).cpu()


def timed_seconds(step: Callable[[torch.Tensor], object], images: torch.Tensor, batch_size: int,
                  warmup_steps: int, timed_steps: int) -> list[float]:
    """Run ``warmup_steps`` untimed then ``timed_steps`` timed steps; seconds of each timed step.

    Batches cycle through ``images`` (repeating them when there are fewer than a batch).
    """
    seconds = []
    for i in range(warmup_steps + timed_steps):
        index = (torch.arange(batch_size) + i * batch_size) % len(images)
        batch = images[index]  # gathered before the clock starts
        start = time.perf_counter()
        step(batch)  # returns host tensors: on CUDA the device work has finished when it returns
        if i >= warmup_steps:
            seconds.append(time.perf_counter() - start)
    return seconds


def measure_speed(runner: SlotRunner, grid: TileGrid, images: torch.Tensor, merge_cfg: DictConfig,
                  warmup: int, repeats: int, throughput_batch_size: int) -> dict:
    """Latency (ms, batch size 1) and throughput (images/s) of the full tiled inference step.

    images: uint8 (N, 3, H, W) at the setup's image size (e.g. the test split).
    """
    if len(images) == 0:
        raise ValueError("measure_speed needs at least one image")
    if repeats < 1 or throughput_batch_size < 1 or warmup < 0:
        raise ValueError(f"speed: need repeats >= 1, batch_size >= 1, warmup >= 0; got {repeats}, {throughput_batch_size}, {warmup}")
    models = [runner.load(slot) for slot in range(len(runner.slots))]
    step = TiledInference(models, runner.slots, grid, merge_cfg, runner.device)

    latency = timed_seconds(step, images, 1, warmup, repeats)
    batch = throughput_batch_size
    batches = timed_seconds(step, images, batch, math.ceil(warmup / batch), math.ceil(repeats / batch))
    del step, models
    runner.release()
    return {
        "latency_ms": round(1000 * sum(latency) / len(latency), 3),
        "throughput_images_per_second": round(batch * len(batches) / sum(batches), 3),
        "throughput_batch_size": batch,
    }
