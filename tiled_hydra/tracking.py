"""Weights & Biases: one W&B run per Hydra job; the jobs of one multirun share a group."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class NoTracker:
    def log_results(self, results: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    def __init__(self, cfg: DictConfig, run_dir: Path, group: str | None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=cfg.logger.mode,
            dir=str(run_dir),
            group=cfg.logger.group or group,
            name=cfg.logger.run_name,
            job_type=str(cfg.setup.name) if "setup" in cfg else None,
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )

    def log_results(self, results: dict) -> None:
        self.run.log({k: v for k, v in results.items() if isinstance(v, (int, float))})
        self.run.summary.update(results)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: DictConfig, run_dir: Path, group: str | None):
    if cfg.logger.backend == "none":
        return NoTracker()
    return WandbTracker(cfg, run_dir, group)
