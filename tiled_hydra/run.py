"""One run: data -> tiles -> slots -> merged predictions -> post-processing -> metrics -> report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tiled_hydra.backbone import build_backbone
from tiled_hydra.data.base import AnomalyData, Split
from tiled_hydra.bootstrap import PER_IMAGE_FILE, save_per_image
from tiled_hydra.datastats import defect_share
from tiled_hydra.ensemble import SlotRunner, summarize
from tiled_hydra.errors import ConfigError, DataError, instantiate_checked
from tiled_hydra.evaluation import pixel_metrics
from tiled_hydra.latency import measure_speed
from tiled_hydra.memory import PeakMemory
from tiled_hydra.merge import merge_scores, smooth_seams
from tiled_hydra.metrics import compute_metrics
from tiled_hydra.postprocess import cross_fit, fit_postprocessor, fold_postprocessors
from tiled_hydra.report import write_overlays, write_region_recall_figure
from tiled_hydra.tiling import TileGrid

log = logging.getLogger("tiled_hydra")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def resolve_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("gpu", "cuda"):
        raise ConfigError("trainer.accelerator=gpu but CUDA is not available; use trainer.accelerator=cpu")
    return torch.device("cpu")


def make_grid(setup: DictConfig) -> TileGrid:
    try:
        return TileGrid.create(setup.image_size, setup.tile_size, setup.stride)
    except ValueError as err:
        raise ConfigError(f"setup {setup.name}: {err}") from None


def check_config(cfg: DictConfig) -> None:
    from tiled_hydra.validate import validate

    validate(cfg)


def predict_split(runner: SlotRunner, grid: TileGrid, split: Split, cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Merged full-resolution maps (N, H, W), image scores (N,) and the model passes' peak memory."""
    map_sum = torch.zeros(len(split), *grid.image_size)
    tile_scores = torch.zeros(len(split), grid.num_tiles)
    peak_bytes = runner.predict_all(split.images, map_sum, tile_scores)
    maps = map_sum.div_(grid.coverage())
    smoothing = cfg.merge.seam_smoothing
    if smoothing.enabled:
        maps = smooth_seams(maps, grid, sigma=float(smoothing.sigma), width_fraction=float(smoothing.width_fraction))
    return maps, merge_scores(tile_scores, cfg.merge.score), peak_bytes


def run(cfg: DictConfig, run_dir: Path) -> dict:
    check_config(cfg)
    device = resolve_device(str(cfg.trainer.accelerator))
    grid = make_grid(cfg.setup)
    log.info("setup %s: %s image, %s tiles, stride %s -> %d tiles, %s", cfg.setup.name, grid.image_size,
             grid.tile_size, grid.stride, grid.num_tiles, "one shared model" if cfg.setup.shared else "one model per tile")

    data: AnomalyData = instantiate_checked(cfg.dataset, image_size=list(grid.image_size))
    if len(data.train) < 2:
        raise DataError(f"{cfg.dataset.name}: need at least 2 training images, found {len(data.train)}")
    log.info("data: %d train, %d val, %d test images", len(data.train), len(data.val) if data.val else 0, len(data.test))

    backbone = build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True), layers=list(cfg.model.net.layers))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["accelerator"] = "gpu" if device.type == "cuda" else "cpu"
    runner = SlotRunner(cfg, grid, backbone, device, run_dir / "checkpoints", trainer_kwargs)

    def report_slot(slot: int, total: int, what: str) -> None:
        log.info("slot %d of %d %s", slot + 1, total, what)

    train = summarize(runner.train_all(data.train.images, report_slot))  # over all slots, resumed ones too

    val_maps = val_scores = None
    if data.val is not None:
        val_maps, val_scores, _ = predict_split(runner, grid, data.val, cfg)
    start = time.perf_counter()
    test_maps, test_scores, infer_peak = predict_split(runner, grid, data.test, cfg)
    infer_seconds = time.perf_counter() - start

    speed = {}
    if cfg.speed.enabled:
        speed = measure_speed(runner, grid, data.test.images, cfg.merge, warmup=int(cfg.speed.warmup),
                              repeats=int(cfg.speed.repeats), throughput_batch_size=int(cfg.speed.batch_size))

    test = data.test
    if data.val is not None:
        post = fit_postprocessor(val_scores, data.val.labels, val_maps, data.val.masks)
        pred_labels, pred_masks = post.predict(test_scores, test_maps)
        norm_maps = post.normalize_maps(test_maps)
        pixel_thresholds = torch.full((len(test),), post.pixel_threshold)
    else:
        fitted = fold_postprocessors(test_scores, test.labels, test_maps, test.masks, int(cfg.seed))
        pred_labels, pred_masks, _, norm_maps = cross_fit(test_scores, test.labels, test_maps, test.masks,
                                                          int(cfg.seed), fitted=fitted)
        folds, posts = fitted
        pixel_thresholds = torch.tensor([posts[int(f)].pixel_threshold for f in folds])
    metrics = compute_metrics(test_scores, test.labels, pred_labels)
    per_image: dict = {}  # per-image records for bootstrap intervals in compare (bootstrap.py)
    if test.masks is not None:  # pixel metrics at metrics.resolution (evaluation.py)
        metrics |= pixel_metrics(test_maps, test, pixel_thresholds, cfg.metrics, per_image=per_image)
    save_per_image(run_dir / PER_IMAGE_FILE, test.paths or [str(i) for i in range(len(test))], test.labels,
                   test_scores, per_image)
    results = {
        **metrics,
        **train,  # train_seconds, train_peak_mem_bytes, resumed_slots, checkpoint_bytes
        "infer_peak_mem_bytes": int(infer_peak),
        "mem_kind": PeakMemory(device).kind,
        "infer_seconds": round(infer_seconds, 3),
        "infer_images_per_second": round(len(test) / infer_seconds, 3),
        **speed,
        "num_tiles": grid.num_tiles,
        "num_models": len(runner.slots),
        "setup": str(cfg.setup.name),
        "model": str(cfg.model.name),
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
        "category": str(cfg.dataset.category),
        "seed": int(cfg.seed),
        "fingerprint": runner.fingerprint,  # of every setting that changes the weights (tiled_hydra.rundir)
        "defect_share": defect_share(test),  # mean anomalous share per defective test image (paper Fig. 7)
    }
    write_overlays(run_dir, test, test_scores, norm_maps, pred_masks, int(cfg.report.overlays))
    write_region_recall_figure(run_dir, results)
    return results
