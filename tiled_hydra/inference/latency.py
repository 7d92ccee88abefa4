"""Latency and throughput of the whole inference step, as the paper measures them (§4.1).

Protocol (EfficientAD's, followed by paper 000 and paper 003): untimed warm-up steps first,
then timed steps; latency at batch size 1 (mean time of one step), throughput at a larger batch
size (timed images / timed seconds).  ``warmup`` and ``repeats`` count *images* in both
measurements, so the throughput measurement costs about as much as the latency one.

The timed step is one call of the run's own inference engine (:mod:`tiled_hydra.inference.engine`)
on a batch of uint8 images: tiling, every slot's model on its tiles, untiling (overlaps
averaged), seam smoothing, image score, maps and scores in host memory.  The engine is built
with its slot models read from their checkpoints once, before timing, and kept in host memory:
reading checkpoints from disk is not inference.  Where the weights live during a step is the
engine's device policy (``inference.mode``): in ``sequential`` mode on CUDA each slot's own
weights move to the device for its tiles and back after (the paper's latency overhead of
ENS4/ENS9); in ``resident`` mode they stay on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


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


def measure_speed(step: Callable[[torch.Tensor], object], images: torch.Tensor, warmup: int, repeats: int,
                  throughput_batch_size: int) -> dict:
    """Latency (ms, batch size 1) and throughput (images/s) of ``step`` (an :class:`InferenceEngine`).

    images: uint8 (N, 3, H, W) at the setup's image size (e.g. the test split).
    """
    if len(images) == 0:
        raise ValueError("measure_speed needs at least one image")
    if repeats < 1 or throughput_batch_size < 1 or warmup < 0:
        raise ValueError(f"speed: need repeats >= 1, batch_size >= 1, warmup >= 0; got {repeats}, {throughput_batch_size}, {warmup}")
    latency = timed_seconds(step, images, 1, warmup, repeats)
    batch = throughput_batch_size
    batches = timed_seconds(step, images, batch, math.ceil(warmup / batch), math.ceil(repeats / batch))
    return {
        "latency_ms": round(1000 * sum(latency) / len(latency), 3),
        "throughput_images_per_second": round(batch * len(batches) / sum(batches), 3),
        "throughput_batch_size": batch,
    }
