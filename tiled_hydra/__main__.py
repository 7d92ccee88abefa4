"""Command line: ``python -m tiled_hydra +setup=ens9 model=padim`` (any Hydra override works)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tiled_hydra.errors import ConfigError, TiledHydraError
from tiled_hydra.validate import CONF_DIR, group_options, user_groups

log = logging.getLogger("tiled_hydra")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log.info("run dir: %s (the same hydra.run.dir=%s resumes an interrupted run)", run_dir, run_dir)
    from tiled_hydra.rundir import RunDirLock

    try:
        from tiled_hydra.validate import validate

        validate(cfg)  # before any data loads
        with RunDirLock(run_dir):
            return run_job(cfg, run_dir)
    except TiledHydraError as err:
        fail(err)


def run_job(cfg: DictConfig, run_dir: Path) -> dict:
    """One job in a run directory it holds the lock of."""
    from tiled_hydra.rundir import check_results, check_slot_records, checkpoint_dir, save_config, slot_identity
    from tiled_hydra.run import ensemble_stage

    hydra_cfg = HydraConfig.get()
    stage, shard, num_shards = ensemble_stage(cfg)
    shared = bool(cfg.get("ensemble", {}).get("checkpoint_dir"))
    if hydra_cfg.mode == RunMode.MULTIRUN and num_shards > 1 and not shared:
        raise ConfigError("ensemble.num_shards > 1 in a multirun: set ensemble.checkpoint_dir=DIR, the directory "
                          "every shard trains its slots into (each job has its own run dir)")
    checkpoints = checkpoint_dir(cfg, run_dir)
    # Results or slots of another configuration are refused before this job writes anything.
    check_slot_records(checkpoints, slot_identity(cfg), shared=shared)
    done = check_results(run_dir, cfg)
    if done is not None and cfg.get("skip_completed", False) and stage != "train":
        # Re-running a sweep into the same hydra.sweep.dir skips the jobs that already finished.
        log.info("skipped: %s holds the results of this configuration (skip_completed=false runs it again)",
                 run_dir / "results.json")
        return done
    save_config(run_dir, cfg, list(hydra_cfg.overrides.task))  # this job now owns the directory

    # Imports inside: `--help` and config errors answer without loading torch.
    from tiled_hydra.report import print_table
    from tiled_hydra.rundir import write_json_atomic
    from tiled_hydra.run import run, train_only
    from tiled_hydra.tracking import make_tracker, read_slot_records

    # The run collects garbage after every slot (a LightningModule lives in reference cycles, and its
    # weights must go before the next slot's load). A full collection walks every tracked object,
    # and the libraries just imported hold ~1 M of them: ~0.3 s per collection, ~6 s of an ENS9
    # PaDiM run. Frozen objects are skipped; a multirun's next job starts from a clean state.
    gc.collect()
    gc.freeze()
    try:
        if stage == "train":  # a shard, or training only: the slots' records are the results (logged by the evaluation)
            return train_only(cfg, run_dir)
        group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
        tracker = make_tracker(cfg, run_dir, group)
        try:
            results = run(cfg, run_dir)
            tracker.log_slots(read_slot_records(checkpoints))
            tracker.log_results(results)
            tracker.log_overlays(sorted((run_dir / "overlays").glob("*.png")))
        except BaseException:
            tracker.finish(exit_code=1)
            raise
        tracker.finish()
    finally:
        gc.unfreeze()
    write_json_atomic(run_dir / "results.json", results)  # last: its presence means the run completed
    if not cfg.get("keep_checkpoints", True):
        freed = sum(p.stat().st_size for p in checkpoints.glob("slot_*.pt"))
        for path in checkpoints.glob("slot_*.pt"):
            path.unlink()
        log.info("keep_checkpoints=false: deleted the slot checkpoints (%.1f MiB); results, config and records stay",
                 freed / 2**20)
    print_table(results)
    log.info("results: %s", run_dir / "results.json")
    return results


def fail(err: Exception) -> None:
    if logging.getLogger().handlers:  # inside Hydra: also in the job's log file (stdout); before it, stderr only
        log.error("%s", err)
    print(f"tiled_hydra: error: {err}", file=sys.stderr)
    sys.exit(1)


# -- before Hydra: help and the choice of every config group ----------------------------------------
HELP = """usage: python -m tiled_hydra +setup=SETUP [group=option ...] [key=value ...]
       python -m tiled_hydra -m +setup=sm256,ens9 model=padim,patchcore ...   (a sweep)

+setup= is required: {setups}

config groups (option in [brackets] is the default):
{groups}

common keys: seed=0  dataset.category=...  dataset.root=DIR  model.max_steps=N  trainer.accelerator=cpu|gpu
             hydra.run.dir=DIR (re-run with the same DIR to resume)  skip_completed=true|false
             keep_checkpoints=true|false  progress=auto|true|false  logger=none
every key and its default: python -m tiled_hydra +setup=sm256 --cfg job
Hydra's own help: python -m tiled_hydra --hydra-help
"""


def defaults() -> dict[str, str]:
    import yaml

    out = {}
    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            out |= {str(k): str(v) for k, v in entry.items()}
    return out


def help_text() -> str:
    chosen = defaults()
    lines = []
    for group in user_groups():
        if group == "setup":
            continue
        options = [f"[{o}]" if o == chosen.get(group) else o for o in group_options(group)]
        prefix = "+" if group not in chosen else ""
        lines.append(f"  {prefix}{group}=  {', '.join(options)}")
    launchers = ", ".join(group_options("hydra/launcher"))
    lines.append(f"  hydra/launcher=  {launchers}  (with -m: where the jobs of a sweep run)")
    return HELP.format(setups=", ".join(group_options("setup")), groups="\n".join(lines))


def check_group_choices(args: list[str]) -> None:
    """An unknown option of a config group (model=nope, +setup=ens99) as one line naming the choices."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra._internal.utils import get_args_parser

    try:  # Hydra's own parser tells overrides from its flags (--cfg job, -p KEY, --config-name NAME)
        overrides = get_args_parser().parse_known_args(args)[0].overrides
    except SystemExit:
        return  # Hydra reports its own flag errors
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    groups = set(user_groups())
    for override in parsed:
        group = override.key_or_group
        if group not in groups or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if value is None or str(value) == "null":
                continue
            if not (CONF_DIR / group / f"{value}.yaml").exists():
                plus = "+" if group == "setup" and override.is_add() else ""
                raise ConfigError(f"{plus}{group}={value}: no such option ({group}/{value}); choose one of "
                                  f"{', '.join(group_options(group))}")


def cli(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else args
    if any(a in ("-h", "--help") for a in args):
        print(help_text())
        return
    try:
        check_group_choices(args)
    except ConfigError as err:
        fail(err)
    # Hydra raises instead of printing its multi-line report and HYDRA_FULL_ERROR hint; its
    # composition errors (a key that does not exist, a bad override) become one line below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fail(ConfigError(f"{first} (python -m tiled_hydra --help lists the groups and keys)"))


if __name__ == "__main__":
    cli()
