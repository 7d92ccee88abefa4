"""Command line: ``python -m tiled_hydra +setup=ens9 model=padim`` (any Hydra override works)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tiled_hydra.errors import TiledHydraError

log = logging.getLogger("tiled_hydra")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    # Re-running a sweep into the same hydra.sweep.dir skips the jobs that already finished:
    # results.json is written last, so its presence means the job completed.
    done = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    if cfg.get("skip_completed", False) and done.exists():
        log.info("skipped: %s exists (skip_completed=false runs it again)", done)
        return json.loads(done.read_text())

    # Imports inside: `--help` and config errors answer without loading torch.
    from tiled_hydra.report import print_table, write_json_atomic
    from tiled_hydra.run import check_config, run
    from tiled_hydra.tracking import make_tracker

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        check_config(cfg)
        tracker = make_tracker(cfg, run_dir, group)
    except TiledHydraError as err:
        fail(err)
    try:
        results = run(cfg, run_dir)
        tracker.log_results(results)
    except TiledHydraError as err:
        tracker.finish(exit_code=1)
        fail(err)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    write_json_atomic(run_dir / "results.json", results)  # last: its presence means the run completed
    print_table(results)
    log.info("results: %s", run_dir / "results.json")
    return results


def fail(err: Exception) -> None:
    log.error("%s", err)
    print(f"tiled_hydra: error: {err}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
