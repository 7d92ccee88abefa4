"""One run: data -> tiles -> slots -> merged predictions -> post-processing -> metrics -> report."""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from tiled_hydra.backbone import build_backbone
from tiled_hydra.data.base import AnomalyData, Split
from tiled_hydra.bootstrap import PER_IMAGE_FILE, save_per_image
from tiled_hydra.datastats import defect_share
from tiled_hydra.ensemble import SlotRunner, shard_slots, show_progress, summarize
from tiled_hydra.errors import ConfigError, DataError, instantiate_checked
from tiled_hydra.evaluation import pixel_metrics
from tiled_hydra.inference import InferenceSettings, Prediction, check_whole_image, engine_for, slot_weight_bytes
from tiled_hydra.latency import measure_speed
from tiled_hydra.memory import PeakMemory
from tiled_hydra.metrics import compute_metrics
from tiled_hydra.postprocess import POSTPROCESS_FILE, cross_fit, fit_postprocessor, fold_postprocessors, save_postprocessor
from tiled_hydra.report import write_overlays, write_region_recall_figure
from tiled_hydra.rundir import checkpoint_dir, config_fingerprint, write_json_atomic
from tiled_hydra.tiling import TileGrid
from tiled_hydra.workers import local_workers

log = logging.getLogger("tiled_hydra")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
SHARD_FILE = "shard.json"  # what a training-only job (ensemble.stage=train or a shard) leaves in its run dir


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


def write_test_predictions(path: Path, split: Split, scores: torch.Tensor, pred_labels: torch.Tensor) -> None:
    """Per test image: its file, label, raw score and predicted label (what ``predict`` reproduces)."""
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score", "pred_label"])
        for i in range(len(split)):
            writer.writerow([split.paths[i] if split.paths else i, int(split.labels[i]), repr(float(scores[i])), int(pred_labels[i])])
    os.replace(tmp, path)


class Stages:
    """Wall time, CPU time and minor page faults per stage of the run, logged as one line at the end."""

    def __init__(self):
        import resource

        self._resource = resource
        self.rows: list[tuple[str, float, float, int]] = []
        started = psutil.Process().create_time()
        self.rows.append(("startup", time.time() - started, time.process_time(), self._faults()))
        self._mark = (time.perf_counter(), time.process_time(), self._faults())

    def _faults(self) -> int:
        return self._resource.getrusage(self._resource.RUSAGE_SELF).ru_minflt

    def done(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time(), self._faults())
        self.rows.append((name, now[0] - self._mark[0], now[1] - self._mark[1], now[2] - self._mark[2]))
        self._mark = now

    def summary(self) -> str:
        return "; ".join(f"{name} {wall:.1f} s (cpu {cpu:.1f} s, {faults / 1e6:.2f} M faults)" for name, wall, cpu, faults in self.rows)


def evaluate(runner: SlotRunner, cfg: DictConfig, splits: list[Split]) -> tuple[list[Prediction], float, int]:
    """The run's predictions of ``splits`` (validation and test together: every slot checkpoint is
    read once), the seconds they took and the peak memory of the model passes."""
    engine = engine_for(runner, cfg, keep=False)
    engine.progress = show_progress(cfg.get("progress", "auto"))
    start = time.perf_counter()
    predictions = engine.predict(*(split.images for split in splits))
    return predictions, time.perf_counter() - start, engine.peak_bytes


@dataclass
class Prepared:
    grid: TileGrid
    data: AnomalyData
    runner: SlotRunner
    settings: InferenceSettings
    device: torch.device


def ensemble_stage(cfg: DictConfig) -> tuple[str, int | None, int]:
    """(stage, shard, num_shards) of ``ensemble.*``; a job with a shard only trains."""
    node = cfg.get("ensemble") or {}
    shard = node.get("shard")
    stage = str(node.get("stage", "all"))
    return ("train" if shard is not None else stage), (None if shard is None else int(shard)), int(node.get("num_shards", 1))


def prepare(cfg: DictConfig, run_dir: Path, stages: "Stages") -> Prepared:
    """Data, backbone and the slot runner over the run's checkpoint directory."""
    check_config(cfg)
    device = resolve_device(str(cfg.trainer.accelerator))
    grid = make_grid(cfg.setup)
    log.info("setup %s: %s image, %s tiles, stride %s -> %d tiles, %s", cfg.setup.name, grid.image_size,
             grid.tile_size, grid.stride, grid.num_tiles, "one shared model" if cfg.setup.shared else "one model per tile")

    data: AnomalyData = instantiate_checked(cfg.dataset, image_size=list(grid.image_size))
    if len(data.train) < 2:
        raise DataError(f"{cfg.dataset.name}: need at least 2 training images, found {len(data.train)}")
    log.info("data: %d train, %d val, %d test images", len(data.train), len(data.val) if data.val else 0, len(data.test))
    stages.done("data")

    backbone = build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True), layers=list(cfg.model.net.layers))
    settings = InferenceSettings.from_cfg(cfg)  # a bad inference.* value fails before training
    if settings.features == "whole_image":
        check_whole_image(grid, backbone)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["accelerator"] = "gpu" if device.type == "cuda" else "cpu"
    runner = SlotRunner(cfg, grid, backbone, device, checkpoint_dir(cfg, run_dir), trainer_kwargs)
    return Prepared(grid, data, runner, settings, device)


def report_slot(slot: int, total: int, what: str) -> None:
    log.info("slot %d of %d %s", slot + 1, total, what)


def train_command(cfg: DictConfig) -> str:
    """The command line of this job, as a training-only job (for the missing-slots error)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ensemble.stage=", "ensemble.shard="))]
    except ValueError:  # not inside a Hydra job (tests composing the config)
        overrides = [f"+setup={cfg.setup.name}", f"model={cfg.model.name}", "..."]
    return " ".join(["python -m tiled_hydra", *overrides, "ensemble.stage=train"])


def require_trained(runner: SlotRunner, cfg: DictConfig) -> list[dict]:
    """Every slot's record (marked resumed), or one ConfigError line naming the missing slots and
    how to train them.  Each checkpoint is checksummed once, here."""
    records = {slot: runner.trained_record(slot) for slot in range(len(runner.slots))}
    missing = [slot for slot, record in records.items() if record is None]
    if missing:
        shown = ", ".join(str(s) for s in missing[:12]) + (", ..." if len(missing) > 12 else "")
        raise ConfigError(f"ensemble.stage=evaluate: slots {shown} ({len(missing)} of {len(runner.slots)}) are not trained "
                          f"in {runner.checkpoint_dir}; train them first: {train_command(cfg)}")
    return [{**record, "resumed": True} for record in records.values()]


def train_only(cfg: DictConfig, run_dir: Path) -> dict:
    """ensemble.stage=train or ensemble.shard=K: train (this shard's) missing slots into the
    checkpoint directory and stop; RUN_DIR/shard.json says what was done and what is missing."""
    stages = Stages()
    _, shard, num_shards = ensemble_stage(cfg)
    prep = prepare(cfg, run_dir, stages)
    runner = prep.runner
    slots = shard_slots(len(runner.slots), shard, num_shards)
    what = f"shard {shard} of {num_shards}" if shard is not None else "all shards"
    log.info("%s: slots %s of %d, checkpoints in %s", what, slots, len(runner.slots), runner.checkpoint_dir)
    records = runner.train_all(prep.data.train.images, report_slot, slots=slots, shard=shard)
    stages.done("train")
    missing = runner.missing_slots()
    summary = {
        **summarize(records),
        "stage": "train", "shard": shard, "num_shards": num_shards, "slots": slots,
        "checkpoint_dir": str(runner.checkpoint_dir), "missing_slots": missing,
        "fingerprint": config_fingerprint(cfg), "slot_fingerprint": runner.fingerprint,
        "setup": str(cfg.setup.name), "model": str(cfg.model.name),
    }
    write_json_atomic(run_dir / SHARD_FILE, summary)
    if missing:
        log.info("%d of %d slots still missing (other shards); once trained, evaluate with ensemble.stage=evaluate",
                 len(missing), len(runner.slots))
    else:
        log.info("every slot is trained; evaluate with: %s", train_command(cfg).replace("ensemble.stage=train", "ensemble.stage=evaluate"))
    log.info("stages: %s", stages.summary())
    return summary


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """ensemble.stage=all (train what is missing, then evaluate) or evaluate (every slot trained)."""
    stages = Stages()
    stage, _, _ = ensemble_stage(cfg)
    prep = prepare(cfg, run_dir, stages)
    grid, data, runner, settings, device = prep.grid, prep.data, prep.runner, prep.settings, prep.device
    if stage == "evaluate":
        records = require_trained(runner, cfg)
    else:
        with local_workers(cfg, run_dir, runner.checkpoint_dir, len(runner.slots)) as workers:
            if workers is not None:  # shard 0 here, the other shards in the worker processes
                runner.train_all(data.train.images, report_slot, slots=shard_slots(len(runner.slots), 0, workers.workers), shard=0)
                workers.wait()  # each shard's slots are its own process's: a failed worker fails the run here
            records = runner.train_all(data.train.images, report_slot)  # over all slots, resumed ones too
        if workers is not None:
            records = workers.mark_trained_here(records)
    train = summarize(records)
    stages.done("train")

    splits = [data.test] if data.val is None else [data.val, data.test]
    predictions, infer_seconds, infer_peak = evaluate(runner, cfg, splits)
    test_maps, test_scores = predictions[-1]
    stages.done("predict")

    speed = {}
    if cfg.speed.enabled:
        speed_engine = engine_for(runner, cfg, keep=True)  # checkpoints read before timing
        speed = measure_speed(speed_engine, data.test.images, warmup=int(cfg.speed.warmup),
                              repeats=int(cfg.speed.repeats), throughput_batch_size=int(cfg.speed.batch_size))
        del speed_engine
        runner.release()
        stages.done("speed")

    test = data.test
    if data.val is not None:
        val_maps, val_scores = predictions[0]
        post = fit_postprocessor(val_scores, data.val.labels, val_maps, data.val.masks)
        del predictions, val_maps
        pred_labels, pred_masks = post.predict(test_scores, test_maps)
        norm_maps = post.normalize_maps(test_maps)
        pixel_thresholds = torch.full((len(test),), post.pixel_threshold)
        save_postprocessor(run_dir / POSTPROCESS_FILE, post, fitted_on="validation split")
    else:
        del predictions
        fitted = fold_postprocessors(test_scores, test.labels, test_maps, test.masks, int(cfg.seed))
        pred_labels, pred_masks, _, norm_maps = cross_fit(test_scores, test.labels, test_maps, test.masks,
                                                          int(cfg.seed), fitted=fitted)
        folds, posts = fitted
        pixel_thresholds = torch.tensor([posts[int(f)].pixel_threshold for f in folds])
        # For new images only (predict): fitted on every test image. Never used for the reported
        # metrics, which keep the 2-fold cross-fit above (no image thresholded by itself).
        deploy = fit_postprocessor(test_scores, test.labels, test_maps, test.masks)
        save_postprocessor(run_dir / POSTPROCESS_FILE, deploy, fitted_on="all test images (no validation split); deployment only")
    write_test_predictions(run_dir / TEST_PREDICTIONS_FILE, test, test_scores, pred_labels)
    metrics = compute_metrics(test_scores, test.labels, pred_labels)
    per_image: dict = {}  # per-image records for bootstrap intervals in compare (bootstrap.py)
    if test.masks is not None:  # pixel metrics at metrics.resolution (evaluation.py)
        metrics |= pixel_metrics(test_maps, test, pixel_thresholds, cfg.metrics, per_image=per_image)
    save_per_image(run_dir / PER_IMAGE_FILE, test.paths or [str(i) for i in range(len(test))], test.labels,
                   test_scores, per_image)
    stages.done("postprocess+metrics")
    results = {
        **metrics,
        **train,  # train_seconds, train_peak_mem_bytes, resumed_slots, checkpoint_bytes
        "infer_peak_mem_bytes": int(infer_peak),
        "mem_kind": PeakMemory(device).kind,
        "infer_seconds": round(infer_seconds, 3),
        "infer_images_per_second": round(sum(len(split) for split in splits) / infer_seconds, 3),  # val + test
        "inference_mode": settings.mode,
        "inference_features": settings.features,
        "slot_weights_bytes": int(slot_weight_bytes(runner.checkpoint_dir)),
        **speed,
        "num_tiles": grid.num_tiles,
        "merge_score": str(cfg.merge.score),  # image score from tile scores: mean (paper 000 Eq. 5) or max
        "num_models": len(runner.slots),
        "setup": str(cfg.setup.name),
        "model": str(cfg.model.name),
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
        "category": str(cfg.dataset.category),
        "seed": int(cfg.seed),
        "fingerprint": config_fingerprint(cfg),  # of every setting that changes a result (tiled_hydra.rundir)
        "slot_fingerprint": runner.fingerprint,  # of every setting that changes the slots' weights
        "defect_share": defect_share(test),  # mean anomalous share per defective test image (paper Fig. 7)
    }
    write_overlays(run_dir, test, test_scores, norm_maps, pred_masks, int(cfg.report.overlays))
    write_region_recall_figure(run_dir, results)
    stages.done("report")
    log.info("stages: %s", stages.summary())
    return results
