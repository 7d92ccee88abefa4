"""One model slot fitted at one resolution, and what is measured on it (paper 003 protocol, batch size 1).

At resolution R the slot is built as a single model on R x R images (a 1x1 tile grid) and
fitted the way the ensemble fits it, on ``n_train`` generated images: the state that inference
needs grows with R (PaDiM's per-patch Gaussians, PatchCore's memory bank = coreset_ratio x
n_train x patches), so it is fitted at R, not scaled.  Trainable models (FastFlow, RD, ...)
get ``train_steps`` optimizer steps (0: their initial weights); memory and runtime of inference
do not depend on the weights' values.

A :class:`SlotBench` holds the fitted slot and one generated image and measures:
- ``count()``: one pass under hooks, Eq. 1-3 (device-independent);
- ``peak()``: the peak memory of one step. CUDA: the allocator's peak (``reset_peak_memory_stats``
  before the step, ``max_memory_allocated`` after; weights included). CPU: the kernel's high-water
  mark of resident memory (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``) above the
  resident memory before the step, freed heap handed back first (``malloc_trim``), plus the slot's
  resident parameters and buffers, so both kinds mean "whole step".  Without ``clear_refs`` (not
  Linux) resident memory is sampled every 10 ms instead;
- ``timed()``: one timed step with per-component times (hooks; synchronised on CUDA).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from tiled_hydra.core.memory import PeakMemory, release_host_memory
from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.scaling.counting import ComponentProbe

log = logging.getLogger("tiled_hydra")

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
PEAK_METHODS = {"cuda": "CUDA allocator peak (max_memory_allocated)",
                "hwm": "kernel high-water mark of resident memory (VmHWM, reset per step)",
                "sampled": "resident memory sampled every 10 ms"}


def generated_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (n, 3, size, size) smooth colour textures with pixel noise (values do not affect cost)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 16 + 2, size // 16 + 2, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    image = 0.3 + 0.4 * smooth + 0.03 * torch.randn(n, 3, size, size, generator=generator)
    return image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def single_model_cfg(cfg: DictConfig, resolution: int, train_steps: int) -> DictConfig:
    """The study's config as a single-model run at ``resolution`` (what :func:`tiled_hydra.build.build_run` expects).

    Unresolved copy first: model options that follow the tile (``${setup.tile_size}``) see R."""
    run_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(run_cfg):
        run_cfg.setup = {"name": f"scaling{resolution}", "image_size": resolution, "tile_size": resolution,
                         "stride": resolution, "shared": True}
        run_cfg.dataset = {"name": "generated", "n_train": int(cfg.n_train), "seed": int(cfg.seed)}
        if train_steps > 0:
            run_cfg.model.max_steps = train_steps
    return run_cfg


def fit_slot(cfg: DictConfig, backbone: FrozenBackbone, resolution: int, device: torch.device, checkpoint_dir) -> tuple[AnomalyModule, str]:
    """A slot fitted at ``resolution``; returns it in eval mode on ``device`` and how its state was made."""
    train_steps = int(cfg.train_steps)
    from tiled_hydra.build import build_run

    run = build_run(single_model_cfg(cfg, resolution, train_steps), checkpoint_dir, backbone=backbone, device=device)
    model = run.trainer.new_model(0)
    if model.trainable and train_steps <= 0:
        how = "initial weights (not trained)"
    else:
        images = generated_images(int(cfg.n_train), resolution, int(cfg.seed))
        del model
        model = run.trainer.fit(0, images)
        how = f"trained {train_steps} steps on {cfg.n_train} generated images" if model.trainable else \
            f"fitted on {cfg.n_train} generated images"
    return model.to(device).eval(), how


# -- peak of one step --------------------------------------------------------------------------------
def _status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE).group(1)) * 1024


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak resident memory of this process (Linux >= 4.0); False where it cannot."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_method(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "hwm" if reset_high_water_mark() else "sampled"


def step_peak(step, device: torch.device) -> int:
    """Peak bytes of ``step()``: allocator peak on CUDA, resident memory above its value before the step on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    release_host_memory()
    if reset_high_water_mark():
        before = _status_bytes("VmRSS")
        step()
        return max(0, _status_bytes("VmHWM") - before)
    with PeakMemory(device) as memory:
        step()
    return memory.bytes


# -- the bench -------------------------------------------------------------------------------------------
class SlotBench:
    """A fitted slot at one side with its input image; counts, peaks and times its inference step."""

    def __init__(self, slot: AnomalyModule, resolution: int, device: torch.device, seed: int, how: str = "",
                 fit_seconds: float = 0.0):
        self.slot, self.resolution, self.device = slot, resolution, device
        self.probe = ComponentProbe(slot, device)
        self.image = generated_images(1, resolution, seed + 1).to(device).float().div_(255)
        self.how, self.fit_seconds = how, fit_seconds

    def _step(self) -> None:
        maps, scores = self.slot.predict_tiles(self.image)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        del maps, scores

    def describe(self) -> dict:
        return {"resolution": self.resolution, "state_made_by": self.how, "fit_seconds": round(self.fit_seconds, 3),
                "peak_method": peak_method(self.device)}

    @torch.no_grad()
    def count(self) -> dict:
        """Eq. 1-3 per component: {'state': {name: bytes}, 'activation': {name: bytes}}."""
        with self.probe.recording():
            self._step()
        return {"state": self.probe.state_bytes(), "activation": self.probe.activation_bytes()}

    @torch.no_grad()
    def warm(self) -> None:
        self._step()

    @torch.no_grad()
    def peak(self) -> int:
        """Whole-step peak bytes (see the module docstring): on CPU the resident state is added."""
        measured = step_peak(self._step, self.device)
        return measured if self.device.type == "cuda" else measured + sum(self.probe.state_bytes().values())

    @torch.no_grad()
    def timed(self) -> dict:
        """One timed step: {'seconds': total, 'components': {name: seconds}}."""
        with self.probe.recording():
            start = self.probe.now()
            self._step()
            total = self.probe.now() - start
        return {"seconds": total, "components": self.probe.component_seconds(total)}

    def close(self) -> None:
        del self.slot, self.probe, self.image
        release_host_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def make_bench(cfg: DictConfig, backbone: FrozenBackbone, resolution: int, device: torch.device, checkpoint_dir) -> SlotBench:
    start = time.perf_counter()
    slot, how = fit_slot(cfg, backbone, resolution, device, checkpoint_dir)
    bench = SlotBench(slot, resolution, device, int(cfg.seed), how, time.perf_counter() - start)
    release_host_memory()  # what fitting freed is handed back before anything is measured
    return bench


def measure_resolution(cfg: DictConfig, backbone: FrozenBackbone, resolution: int, device: torch.device,
                       checkpoint_dir, warmup: int, repeats: int) -> dict:
    """One side on its own, in this process: counted bytes, the peak of one step, the median of
    ``repeats`` timed steps (no round-robin; the study uses :mod:`tiled_hydra.scaling.protocol`)."""
    from tiled_hydra.scaling.protocol import point_record

    bench = make_bench(cfg, backbone, resolution, device, checkpoint_dir)
    try:
        counted = bench.count()
        for _ in range(max(1, warmup)):
            bench.warm()
        peaks = [bench.peak()]
        samples = [bench.timed() for _ in range(repeats)]
        return point_record(bench.describe(), counted, peaks, samples, "cuda" if device.type == "cuda" else "rss")
    finally:
        bench.close()
