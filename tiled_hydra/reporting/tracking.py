"""Weights & Biases: one W&B run per Hydra job; the jobs of one multirun share a group.

Logged: the resolved config; per slot its training loss curve (``slot_000/train_loss`` against
``slot_000/step``), seconds and peak memory (resumed slots from their records); the results
(summary, and a one-row table); the overlay images. ``logger=none`` logs nothing and never
imports wandb.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class NoTracker:
    def log_run(self, records: list[dict], results: dict, overlays: list[Path]) -> None:
        pass


class WandbTracker:
    def __init__(self, logger: DictConfig, cfg: DictConfig, run_dir: Path, group: str | None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=logger.project,
            entity=logger.entity,
            mode=logger.mode,
            dir=str(run_dir),
            group=logger.group or group,
            name=logger.run_name,
            job_type=str(cfg.setup.name) if "setup" in cfg else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log_run(self, records: list[dict], results: dict, overlays: list[Path]) -> None:
        self.log_slots(records)
        self.log_results(results)
        self.log_overlays(overlays)

    def log_slots(self, records: list[dict]) -> None:
        """Each slot's loss curve on its own step axis, and its cost as summary values."""
        for record in records:
            name = f"slot_{int(record['slot']):03d}"
            self.run.define_metric(f"{name}/train_loss", step_metric=f"{name}/step")
            for step, loss in enumerate(record.get("losses") or []):
                self.run.log({f"{name}/step": step, f"{name}/train_loss": loss})
            self.run.summary.update({f"{name}/seconds": record.get("seconds"),
                                     f"{name}/peak_mem_bytes": record.get("peak_mem_bytes"),
                                     f"{name}/checkpoint_bytes": record.get("checkpoint_bytes")})

    def log_results(self, results: dict) -> None:
        self.run.log({k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        keys = sorted(results)
        self.run.log({"results_table": self.wandb.Table(columns=keys, data=[[str(results[k]) for k in keys]])})
        self.run.summary.update(results)

    def log_overlays(self, paths: list[Path]) -> None:
        if paths:
            self.run.log({"overlays": [self.wandb.Image(str(p), caption=p.stem) for p in paths]})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


@contextmanager
def make_tracker(logger: DictConfig, cfg: DictConfig, run_dir: Path, group: str | None):
    """The run's tracker for the ``with`` block: finished with exit code 1 if the block fails."""
    if logger.backend == "none":
        yield NoTracker()
        return
    tracker = WandbTracker(logger, cfg, run_dir, group)
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
