"""The composition root: the one place where a run's objects are built from its configuration.

Every entry point (the run, ``predict``, the scaling study), benchmark and test gets its tile grid,
data, backbone, slot store, slot trainer and inference engine from here; the objects themselves
take plain values, never the whole configuration.

    run = build_run(cfg, checkpoint_dir)      # grid, backbone, features, store, trainer
    data = build_data(cfg, run.grid)          # images resized to the setup's size
    run.trainer.train(data.train.images)      # every missing slot into the store
    maps, scores = run.engine(keep=False).predict(data.test.images)[0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tiled_hydra.core.features import DEFAULT_CHUNK_PIXELS, TileFeatures
from tiled_hydra.core.merge import MergeSettings
from tiled_hydra.core.progress import data_bars, give_terminal_a_width, show_progress
from tiled_hydra.core.tiling import TileGrid
from tiled_hydra.data.base import AnomalyData
from tiled_hydra.errors import ConfigError, DataError, instantiate_checked
from tiled_hydra.inference.engine import InferenceEngine, InferenceSettings, SlotModels
from tiled_hydra.models.backbone import FrozenBackbone, build_backbone
from tiled_hydra.rundir import checkpoint_dir, slot_identity
from tiled_hydra.slots.store import SlotStore, slot_tiles
from tiled_hydra.slots.trainer import ModelSpec, SlotTrainer

log = logging.getLogger("tiled_hydra")


def resolve_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise ConfigError("trainer.accelerator=gpu but CUDA is not available; use trainer.accelerator=cpu")
    return torch.device("cpu")


def build_grid(setup: DictConfig) -> TileGrid:
    try:
        return TileGrid.create(setup.image_size, setup.tile_size, setup.stride)
    except ValueError as err:
        raise ConfigError(f"setup {setup.name}: {err}") from None


def build_data(cfg: DictConfig, grid: TileGrid) -> AnomalyData:
    with data_bars(show_progress(cfg.get("progress", "auto"))):
        data: AnomalyData = instantiate_checked(cfg.dataset, image_size=list(grid.image_size))
    if len(data.train) < 2:
        raise DataError(f"{cfg.dataset.name}: need at least 2 training images, found {len(data.train)}")
    log.info("data: %d train, %d val, %d test images", len(data.train), len(data.val) if data.val else 0, len(data.test))
    return data


def build_frozen_backbone(cfg: DictConfig, fold_batch_norm: bool = True) -> FrozenBackbone:
    return build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True), layers=list(cfg.model.net.layers),
                          fold_batch_norm=fold_batch_norm)


def merge_settings(merge: DictConfig) -> MergeSettings:
    smoothing = merge.seam_smoothing
    return MergeSettings(str(merge.score), bool(smoothing.enabled), float(smoothing.sigma), float(smoothing.width_fraction),
                         str(merge.get("calibration", "none")), str(merge.get("window", "flat")))


def model_spec(cfg: DictConfig) -> ModelSpec:
    model = cfg.model
    return ModelSpec(str(model.name), model.net, int(model.batch_size), int(model.max_epochs), int(model.max_steps), int(cfg.seed))


@dataclass
class Run:
    """The wired objects of one run (see module doc)."""

    grid: TileGrid
    device: torch.device
    features: TileFeatures
    store: SlotStore
    trainer: SlotTrainer
    merge: MergeSettings
    inference: InferenceSettings
    progress: bool

    @property
    def backbone(self) -> FrozenBackbone:
        return self.features.backbone

    def engine(self, keep: bool, mode: str | None = None) -> InferenceEngine:
        """The inference engine over the store's trained slots. ``keep``: read each checkpoint once and
        keep the models in host memory (speed protocol, predict); ``mode`` overrides ``inference.mode``."""
        settings = self.inference if mode is None else InferenceSettings(mode, self.inference.batch_size)
        models = SlotModels(self.store.load, len(self.store), keep)
        return InferenceEngine(self.grid, self.store.tiles, models, self.features, self.merge, self.device, settings,
                               progress=self.progress)


def build_run(cfg: DictConfig, checkpoints: Path, backbone: FrozenBackbone | None = None,
              device: torch.device | None = None) -> Run:
    """Grid, backbone, features, slot store and trainer of ``cfg``, slots kept in ``checkpoints``."""
    device = device or resolve_device(str(cfg.trainer.accelerator))
    grid = build_grid(cfg.setup)
    log.info("setup %s: %s image, %s tiles, stride %s -> %d tiles, %s", cfg.setup.name, grid.image_size,
             grid.tile_size, grid.stride, grid.num_tiles, "one shared model" if cfg.setup.shared else "one model per tile")
    inference = cfg.get("inference") or {}
    settings = InferenceSettings(str(inference.get("mode", "sequential")), int(cfg.model.batch_size))
    backbone = backbone or build_frozen_backbone(cfg)
    features = TileFeatures(backbone, grid, device, str(inference.get("features", "per_tile")),
                            int(inference.get("backbone_chunk_pixels", DEFAULT_CHUNK_PIXELS)), int(cfg.model.batch_size))
    spec = model_spec(cfg)
    store = SlotStore(checkpoints, slot_identity(cfg), slot_tiles(grid.num_tiles, bool(cfg.setup.shared)),
                      lambda slot: spec.build(backbone, slot))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["accelerator"] = "gpu" if device.type == "cuda" else "cpu"
    progress = show_progress(cfg.get("progress", "auto"))
    if progress:
        give_terminal_a_width()
    trainer = SlotTrainer(store, grid, features, spec, device, trainer_kwargs, progress)
    return Run(grid, device, features, store, trainer, merge_settings(cfg.merge), settings, progress)


def open_trained_run(run_dir: Path, mode: str | None = None, device: str | None = None) -> tuple[DictConfig, Run]:
    """A finished run's configuration and wiring, every slot checked to be trained by this
    configuration and code version; nothing in the run dir is modified."""
    config = Path(run_dir) / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no .hydra/config.yaml)")
    cfg = OmegaConf.load(config)
    checkpoints = checkpoint_dir(cfg, run_dir)  # ensemble.checkpoint_dir when its shards shared one
    if not checkpoints.is_dir():
        raise DataError(f"{run_dir}: no slot checkpoints in {checkpoints}; the run did not train any slot")
    run = build_run(cfg, checkpoints, device=resolve_device(str(device or cfg.trainer.accelerator)))
    missing = [s for s in range(len(run.store)) if not run.store.checkpoint_path(s).is_file()]
    if missing:
        raise DataError(f"{run_dir}: {len(missing)} of {len(run.store)} slots are not trained (e.g. slot {missing[0]}); "
                        "finish the run first")
    for slot in range(len(run.store)):
        path = run.store.checkpoint_path(slot)
        if torch.load(path, map_location="cpu", weights_only=True, mmap=True)["fingerprint"] != run.store.fingerprint:
            raise DataError(f"{path} was written by another version of tiled_hydra (or its config was edited); retrain")
    if mode is not None:
        run.inference = InferenceSettings(mode, run.inference.batch_size)
    return cfg, run
