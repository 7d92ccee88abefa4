"""One run, top to bottom: data -> slots -> merged predictions -> thresholds -> metrics -> report.

``train(cfg, run_dir)`` is the whole job in a run directory that its caller holds the lock of
(:mod:`tiled_hydra.cli.train` parses the command line, then calls it). Training only (a shard, or
``ensemble.stage=train``) stops after the slots: ``train_slots_only``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig

from tiled_hydra.analysis.datastats import defect_share
from tiled_hydra.build import Run, build_data, build_run
from tiled_hydra.core.memory import PeakMemory
from tiled_hydra.core.postprocess import POSTPROCESS_FILE, cross_fit, fit_postprocessor, fold_postprocessors, save_postprocessor
from tiled_hydra.data.base import AnomalyData
from tiled_hydra.errors import ConfigError
from tiled_hydra.inference.latency import measure_speed
from tiled_hydra.metrics import schema
from tiled_hydra.metrics.bootstrap import PER_IMAGE_FILE, save_per_image
from tiled_hydra.metrics.image import image_metrics
from tiled_hydra.metrics.pixel import pixel_metrics
from tiled_hydra.metrics.seams import tile_artefacts
from tiled_hydra.reporting.maps import maps_format
from tiled_hydra.reporting.overlays import write_overlays
from tiled_hydra.reporting.results import write_region_recall_figure, write_test_predictions
from tiled_hydra.reporting.tracking import make_tracker
from tiled_hydra.rundir import (
    check_results, check_slot_records, checkpoint_dir, config_fingerprint, save_config, slot_identity, write_json_atomic,
)
from tiled_hydra.slots.store import shard_slots, training_summary
from tiled_hydra.slots.workers import local_workers

log = logging.getLogger("tiled_hydra")

SHARD_FILE = "shard.json"  # what a training-only job (ensemble.stage=train or a shard) leaves in its run dir
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Job:
    """What the command line adds to the configuration: how the job was asked for."""

    overrides: tuple[str, ...] = ()  # the command's overrides (saved beside the config, given to workers)
    group: str | None = None  # the multirun's sweep dir name: groups the jobs of one sweep in W&B
    multirun: bool = False


@dataclass
class Outcome:
    results: dict
    recomputed: bool  # False: a finished run's results.json, read back (skip_completed)


class Stages:
    """Wall time, CPU time and minor page faults per stage of the run, logged as one line at the end."""

    def __init__(self):
        import resource

        self._resource = resource
        started = psutil.Process().create_time()
        self.rows: list[tuple[str, float, float, int]] = [("startup", time.time() - started, time.process_time(), self._faults())]
        self._mark = (time.perf_counter(), time.process_time(), self._faults())

    def _faults(self) -> int:
        return self._resource.getrusage(self._resource.RUSAGE_SELF).ru_minflt

    def done(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time(), self._faults())
        self.rows.append((name, now[0] - self._mark[0], now[1] - self._mark[1], now[2] - self._mark[2]))
        self._mark = now
        log.info("%s done in %.1f s", name, self.rows[-1][1])

    def summary(self) -> str:
        return "; ".join(f"{name} {wall:.1f} s (cpu {cpu:.1f} s, {faults / 1e6:.2f} M faults)" for name, wall, cpu, faults in self.rows)


def ensemble_stage(cfg: DictConfig) -> tuple[str, int | None, int]:
    """(stage, shard, num_shards) of ``ensemble.*``; a job with a shard only trains."""
    node = cfg.get("ensemble") or {}
    shard = node.get("shard")
    stage = str(node.get("stage", "all"))
    return ("train" if shard is not None else stage), (None if shard is None else int(shard)), int(node.get("num_shards", 1))


def command_line(job: Job, stage: str) -> str:
    """This job's command line as another ensemble stage (for the missing-slots error and hints)."""
    overrides = [o for o in job.overrides if not o.startswith(("ensemble.stage=", "ensemble.shard="))]
    return " ".join(["python -m tiled_hydra", *overrides, f"ensemble.stage={stage}"])


# -- the job -----------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: Path, job: Job = Job()) -> Outcome:
    """The whole job in ``run_dir``: refuse another configuration's files, return a finished run's
    results (skip_completed), else train the missing slots, evaluate, write results.json last."""
    run_dir = Path(run_dir)
    stage, shard, num_shards = ensemble_stage(cfg)
    shared = bool((cfg.get("ensemble") or {}).get("checkpoint_dir"))
    if job.multirun and num_shards > 1 and not shared:
        raise ConfigError("ensemble.num_shards > 1 in a multirun: set ensemble.checkpoint_dir=DIR, the directory "
                          "every shard trains its slots into (each job has its own run dir)")
    checkpoints = checkpoint_dir(cfg, run_dir)
    # Results or slots of another configuration are refused before this job writes anything.
    check_slot_records(checkpoints, slot_identity(cfg), shared=shared)
    done = check_results(run_dir, cfg)
    if done is not None and cfg.get("skip_completed", False) and stage != "train":
        log.info("%s holds the results of this configuration: read, not recomputed (skip_completed=false runs it again)",
                 run_dir / RESULTS_FILE)
        return Outcome(done, recomputed=False)
    save_config(run_dir, cfg, list(job.overrides))  # this job now owns the directory
    if stage == "train":
        return Outcome(train_slots_only(cfg, run_dir, checkpoints, job), recomputed=True)

    stages = Stages()
    run = build_run(cfg, checkpoints)
    data = build_data(cfg, run.grid)
    stages.done("data")
    with make_tracker(cfg.logger, cfg, run_dir, job.group) as tracker:
        records = train_or_resume(cfg, run, data, run_dir, job, stage)
        stages.done("train")
        results = evaluate(cfg, run, data, run_dir, records, stages)
        tracker.log_run(run.store.records(), results, sorted((run_dir / "overlays").glob("*.png")))
    schema.check(results)
    write_json_atomic(run_dir / RESULTS_FILE, results)  # last: its presence means the run completed
    log.info("stages: %s", stages.summary())
    if not cfg.get("keep_checkpoints", True):
        freed = run.store.delete_checkpoints()
        log.info("keep_checkpoints=false: deleted the slot checkpoints (%.1f MiB); results, config and records stay",
                 freed / 2**20)
    return Outcome(results, recomputed=True)


def train_or_resume(cfg: DictConfig, run: Run, data: AnomalyData, run_dir: Path, job: Job, stage: str) -> list[dict]:
    """Every slot's record: trained now (here and in the local workers), found trained, or, with
    ``ensemble.stage=evaluate``, required to be trained already."""
    if stage == "evaluate":
        return require_trained(run, job)
    workers = int((cfg.get("ensemble") or {}).get("workers", 1) or 1)
    with local_workers(workers, len(run.store), run_dir, run.store.directory, job.overrides) as group:
        normals = calibration_images(data)
        if group is not None:  # shard 0 here, the other shards in the worker processes
            run.trainer.train(data.train.images, slots=shard_slots(len(run.store), 0, group.workers), shard=0,
                              calibration_images=normals)
            group.wait()  # each shard's slots are its own process's: a failed worker fails the run here
        records = run.trainer.train(data.train.images, calibration_images=normals)  # over all slots, resumed ones too
    return records if group is None else group.mark_trained_here(records)


def calibration_images(data: AnomalyData):
    """Normal images the slots' calibration statistics come from: the validation split's normal
    images, never test images; the training images when there is no validation split (or no normal
    image in it)."""
    if data.val is not None and bool((data.val.labels == 0).any()):
        return data.val.images[data.val.labels == 0]
    return data.train.images


def require_trained(run: Run, job: Job) -> list[dict]:
    """Every slot's record (marked resumed), or one ConfigError line naming the missing slots and
    how to train them. Each checkpoint is checksummed once, here."""
    records = {slot: run.store.trained_record(slot) for slot in range(len(run.store))}
    missing = [slot for slot, record in records.items() if record is None]
    if missing:
        shown = ", ".join(str(s) for s in missing[:12]) + (", ..." if len(missing) > 12 else "")
        raise ConfigError(f"ensemble.stage=evaluate: slots {shown} ({len(missing)} of {len(run.store)}) are not trained "
                          f"in {run.store.directory}; train them first: {command_line(job, 'train')}")
    return [{**record, "resumed": True} for record in records.values()]


def train_slots_only(cfg: DictConfig, run_dir: Path, checkpoints: Path, job: Job) -> dict:
    """ensemble.stage=train or ensemble.shard=K: train (this shard's) missing slots into the
    checkpoint directory and stop; RUN_DIR/shard.json says what was done and what is missing."""
    stages = Stages()
    _, shard, num_shards = ensemble_stage(cfg)
    run = build_run(cfg, checkpoints)
    data = build_data(cfg, run.grid)
    slots = shard_slots(len(run.store), shard, num_shards)
    what = f"shard {shard} of {num_shards}" if shard is not None else "all shards"
    log.info("%s: slots %s of %d, checkpoints in %s", what, slots, len(run.store), run.store.directory)
    records = run.trainer.train(data.train.images, slots=slots, shard=shard, calibration_images=calibration_images(data))
    stages.done("train")
    missing = run.store.missing()
    summary = {
        **training_summary(records),
        "stage": "train", "shard": shard, "num_shards": num_shards, "slots": slots,
        "checkpoint_dir": str(run.store.directory), "missing_slots": missing,
        "fingerprint": config_fingerprint(cfg), "slot_fingerprint": run.store.fingerprint,
        "setup": str(cfg.setup.name), "model": str(cfg.model.name),
    }
    write_json_atomic(run_dir / SHARD_FILE, summary)
    if missing:
        log.info("%d of %d slots still missing (other shards); once trained, evaluate with ensemble.stage=evaluate",
                 len(missing), len(run.store))
    else:
        log.info("every slot is trained; evaluate with: %s", command_line(job, "evaluate"))
    log.info("stages: %s", stages.summary())
    return summary


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate(cfg: DictConfig, run: Run, data: AnomalyData, run_dir: Path, records: list[dict], stages: Stages) -> dict:
    """Predict validation and test images, fit thresholds on validation data (cross-fitted on the test
    set when there is none), score the test set, write the run's files; returns the results."""
    splits = [data.test] if data.val is None else [data.val, data.test]
    engine = run.engine(keep=False)
    log.info("predicting %d images with %d slots", sum(len(s) for s in splits), len(run.store))
    start = time.perf_counter()
    predictions = engine.predict(*(split.images for split in splits))  # every checkpoint read once
    infer_seconds, infer_peak = time.perf_counter() - start, engine.peak_bytes
    del engine
    test_maps, test_scores = predictions[-1]
    stages.done("predict")

    speed = {}
    if cfg.speed.enabled:
        speed = measure_speed(run.engine(keep=True), data.test.images, warmup=int(cfg.speed.warmup),
                              repeats=int(cfg.speed.repeats), throughput_batch_size=int(cfg.speed.batch_size))
        stages.done("speed")

    test = data.test
    if data.val is not None:
        val_maps, val_scores = predictions[0]
        post = fit_postprocessor(val_scores, data.val.labels, val_maps, data.val.masks)
        del predictions, val_maps
        pred_labels = post.predict(test_scores)[0]
        pixel_thresholds = torch.full((len(test),), post.pixel_threshold)
        save_postprocessor(run_dir / POSTPROCESS_FILE, post, fitted_on="validation split")
    else:
        del predictions
        fitted = fold_postprocessors(test_scores, test.labels, test_maps, test.masks, int(cfg.seed))
        pred_labels = cross_fit(test_scores, test.labels, None, None, int(cfg.seed), fitted=fitted)[0]
        folds, posts = fitted
        pixel_thresholds = torch.tensor([posts[int(f)].pixel_threshold for f in folds])
        # For new images only (predict): fitted on every test image. Never used for the reported
        # metrics, which keep the 2-fold cross-fit above (no image thresholded by itself).
        deploy = fit_postprocessor(test_scores, test.labels, test_maps, test.masks)
        save_postprocessor(run_dir / POSTPROCESS_FILE, deploy, fitted_on="all test images (no validation split); deployment only")
    metrics = image_metrics(test_scores, test.labels, pred_labels)
    per_image: dict = {}  # per-image records for bootstrap intervals in compare (metrics/bootstrap.py)
    if test.masks is not None:  # pixel metrics at metrics.resolution (metrics/pixel.py)
        metrics |= pixel_metrics(test_maps, test, pixel_thresholds, cfg.metrics, per_image=per_image, progress=run.progress)
    save_per_image(run_dir / PER_IMAGE_FILE, test.paths or [str(i) for i in range(len(test))], test.labels,
                   test_scores, per_image)
    stages.done("metrics")
    results = {
        **metrics,
        **training_summary(records),
        "infer_peak_mem_bytes": int(infer_peak),
        "mem_kind": PeakMemory(run.device).kind,
        "infer_seconds": round(infer_seconds, 3),
        "infer_images_per_second": round(sum(len(split) for split in splits) / infer_seconds, 3),  # val + test
        "inference_mode": run.inference.mode,
        "inference_features": run.features.mode,
        "slot_weights_bytes": int(run.store.weight_bytes()),
        **speed,
        "num_tiles": run.grid.num_tiles,
        "merge_score": run.merge.score,
        "merge_calibration": run.merge.calibration,
        "merge_window": run.merge.window,
        "calibration_fitted_on": "validation normal images" if data.val is not None and bool((data.val.labels == 0).any())
        else "training images",
        **tile_artefacts(test_maps[test.labels == 0], run.grid),
        "num_models": len(run.store),
        "setup": str(cfg.setup.name),
        "model": str(cfg.model.name),
        "backbone": str(cfg.backbone.name),
        "dataset": str(cfg.dataset.name),
        "category": str(cfg.dataset.category),
        "seed": int(cfg.seed),
        "fingerprint": config_fingerprint(cfg),  # of every setting that changes a result (tiled_hydra.rundir)
        "slot_fingerprint": run.store.fingerprint,  # of every setting that changes the slots' weights
        "defect_share": defect_share(test),  # mean anomalous share per defective test image (paper Fig. 7)
    }
    # the postprocessor that labelled each test image: the validation split's, or its cross-fit fold's
    scoring = [post] * len(test) if data.val is not None else [posts[int(f)] for f in folds]
    write_test_predictions(run_dir, test, test_scores, pred_labels, test_maps, scoring,
                           maps_format(cfg.report.get("maps", "png")))
    write_overlays(run_dir, test, test_scores, test_maps, scoring, int(cfg.report.overlays))
    write_region_recall_figure(run_dir, results)
    stages.done("report")
    return results
