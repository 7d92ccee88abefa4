"""Weights & Biases: one W&B run per Hydra job; the jobs of one multirun share a group.

Logged: the resolved config; per slot its training loss curve (``slot_000/train_loss`` against
``slot_000/step``), seconds and peak memory (resumed slots from their records); the results
(summary, and a one-row table); the overlay images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def read_slot_records(checkpoint_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(checkpoint_dir).glob("slot_*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return records


class NoTracker:
    def log_slots(self, records: list[dict]) -> None:
        pass

    def log_results(self, results: dict) -> None:
        pass

    def log_overlays(self, paths: list[Path]) -> None:
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


def make_tracker(cfg: DictConfig, run_dir: Path, group: str | None):
    if cfg.logger.backend == "none":
        return NoTracker()
    return WandbTracker(cfg, run_dir, group)
