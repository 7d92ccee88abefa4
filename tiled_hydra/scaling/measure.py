"""One model slot fitted at each resolution and measured at batch size 1 (paper 003 protocol).

At resolution R the slot is built as a single model on R x R images (a 1x1 tile grid) and
fitted the way the ensemble fits it, on ``n_train`` generated images: the state that inference
needs grows with R (PaDiM's per-patch Gaussians, PatchCore's memory bank = coreset_ratio x
n_train x patches), so it is fitted at R, not scaled.  Trainable models (FastFlow, RD, ...)
get ``train_steps`` optimizer steps (0: their initial weights); memory and runtime of inference
do not depend on the weights' values.

Per resolution: one counting pass (hooks, Eq. 1-3), untimed warm-up steps, one step under
``PeakMemory`` (CUDA allocator peak; on CPU resident memory above the value before the step,
plus the slot's resident parameters and buffers, so both kinds mean "whole step"), then timed
steps with per-component times (means over the timed steps).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from tiled_hydra.models.backbone import FrozenBackbone
from tiled_hydra.core.memory import PeakMemory, release_host_memory
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.scaling.counting import ComponentProbe

log = logging.getLogger("tiled_hydra")


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


def measure_slot(slot: AnomalyModule, resolution: int, device: torch.device, warmup: int, repeats: int,
                 seed: int) -> dict:
    """Counted bytes, measured peak and times of one slot at batch size 1 on one generated image."""
    probe = ComponentProbe(slot, device)
    image = generated_images(1, resolution, seed + 1).to(device).float().div_(255)

    def step() -> None:
        maps, scores = slot.predict_tiles(image)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del maps, scores

    with torch.no_grad():
        with probe.recording():  # counting pass: device-independent Eq. 1-3
            step()
        activation = probe.activation_bytes()
        for _ in range(warmup):
            step()
        release_host_memory()
        with PeakMemory(device) as memory:
            step()
        seconds = {name: 0.0 for name in probe.names}
        totals = []
        for _ in range(repeats):
            with probe.recording():
                start = probe.now()
                step()
                total = probe.now() - start
            totals.append(total)
            for name, value in probe.component_seconds(total).items():
                seconds[name] += value / repeats
    state = probe.state_bytes()
    resident = sum(state.values())
    peak = memory.bytes if memory.kind == "cuda" else memory.bytes + resident
    return {
        "resolution": resolution,
        "components": {name: {"state_bytes": state[name], "activation_bytes": activation[name],
                              "counted_bytes": state[name] + activation[name], "seconds": seconds[name]}
                       for name in probe.names},
        "counted_bytes": sum(state.values()) + sum(activation.values()),
        "state_bytes": resident,
        "activation_bytes": sum(activation.values()),
        "peak_bytes": int(peak),
        "measured_bytes": int(memory.bytes),
        "mem_kind": memory.kind,
        "seconds": sum(totals) / len(totals),
        "seconds_min": min(totals),
    }


def measure_resolution(cfg: DictConfig, backbone: FrozenBackbone, resolution: int, device: torch.device,
                       checkpoint_dir, warmup: int, repeats: int) -> dict:
    start = time.perf_counter()
    slot, how = fit_slot(cfg, backbone, resolution, device, checkpoint_dir)
    fit_seconds = time.perf_counter() - start
    record = measure_slot(slot, resolution, device, warmup, repeats, int(cfg.seed))
    record["fit_seconds"] = round(fit_seconds, 3)
    record["state_made_by"] = how
    del slot
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record
