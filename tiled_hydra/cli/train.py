"""The main command: ``tiled-hydra +setup=ens9 model=padim`` (``python -m tiled_hydra``; any Hydra override).

Parse (Hydra), lock the run directory, call :func:`tiled_hydra.pipeline.train`, print the results.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tiled_hydra.cli.common import fail, first_line, quote_plain_values, shell_quote
from tiled_hydra.config import CONF_DIR, group_options, user_groups
from tiled_hydra.errors import ConfigError, Interrupted, TiledHydraError

log = logging.getLogger("tiled_hydra")
PROG = "tiled_hydra"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    # a launcher's own handler (submitit bypasses SIGTERM so that SLURM can requeue the job) is kept
    own_handler = signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    if own_handler:
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        from tiled_hydra.config import validate

        validate(cfg)  # before any data or model loads; a refused config has no run dir to resume
        log.info("run dir: %s; to resume an interrupted run: %s", run_dir,
                 " ".join(["python -m tiled_hydra", *map(shell_quote, [o for o in overrides if not o.startswith("hydra.run.dir=")]),
                           shell_quote(f"hydra.run.dir={run_dir}")]))
        outcome = run_locked(cfg, run_dir, overrides, hydra_cfg)
    except TiledHydraError as err:
        remove_if_empty(run_dir, hydra_cfg)
        fail(PROG, err)
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return outcome.results


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler's preemption, ``kill``, ``docker stop``) ends the run as a failure in one
    line: the lock is released on the way out, and nothing claims the run finished. Lightning sets
    its own SIGTERM handler only where none is set, so this one also stops a slot's training; where a
    launcher's handler is kept, slots/trainer.py converts Lightning's silent exit."""
    raise Interrupted("stopped by SIGTERM; the slots already saved are kept, run the same command again to resume")


def run_locked(cfg: DictConfig, run_dir: Path, overrides: list[str], hydra_cfg):
    """The pipeline in a run directory this job holds the lock of; the results table printed."""
    # Imports here: --help and configuration errors answer without loading torch.
    from tiled_hydra.pipeline import Job, train
    from tiled_hydra.reporting.results import print_table
    from tiled_hydra.rundir import RunDirLock

    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job = Job(tuple(overrides), Path(hydra_cfg.sweep.dir).name if multirun else None, multirun)
    # The run collects garbage after every slot (a LightningModule lives in reference cycles, and its
    # weights must go before the next slot's load). A full collection walks every tracked object,
    # and the libraries just imported hold ~1 M of them: ~0.3 s per collection, ~6 s of an ENS9
    # PaDiM run. Frozen objects are skipped; a multirun's next job starts from a clean state.
    gc.collect()
    gc.freeze()
    try:
        with RunDirLock(run_dir):
            outcome = train(cfg, run_dir, job)
    finally:
        gc.unfreeze()
    if outcome.results.get("stage") != "train":
        note = None if outcome.recomputed else f"read from {run_dir / 'results.json'} (finished earlier; skip_completed=false recomputes)"
        print_table(outcome.results, note)
        log.info("results: %s", run_dir / "results.json")
    return outcome


#: What a job that failed before doing anything leaves in its run dir: Hydra's log, the lock, the saved config.
_EMPTY_RUN_ENTRIES = {".lock", ".hydra", "tiled_hydra.log"}


def remove_if_empty(run_dir: Path, hydra_cfg) -> None:
    """A failed job's run dir that holds nothing but a log, a lock and a config is removed (its error
    was printed): outputs/ keeps only runs that did something. Hydra's file handler is closed first."""
    try:
        # an empty checkpoints/ is the slot store made before the data failed to load: nothing trained
        entries = {p.name for p in run_dir.iterdir() if not (p.name == "checkpoints" and p.is_dir() and not any(p.iterdir()))}
    except OSError:
        return
    if not entries <= _EMPTY_RUN_ENTRIES:
        return
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)


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
    args = quote_plain_values(args)
    try:
        check_group_choices(args)
    except ConfigError as err:
        fail(PROG, err)
    sys.argv = [sys.argv[0], *args]
    if any("ray_cluster" in a for a in args):  # our Ray launcher, also where an editable install hides hydra_plugins
        from tiled_hydra.cli.ray_launcher import register

        register()
    # Hydra raises instead of printing its multi-line report and HYDRA_FULL_ERROR hint; its
    # composition errors (a key that does not exist, a bad override) become one line below.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        fail(PROG, ConfigError(f"{first_line(err)} (python -m tiled_hydra --help lists the groups and keys)"))
    except ValueError as err:  # Hydra's own flag conflicts (e.g. -m with --cfg)
        fail(PROG, ConfigError(first_line(err)))
    except OSError as err:  # e.g. a hydra.run.dir that cannot be created (a file on its path, no permission)
        where = f"{err.filename}: " if err.filename else ""
        fail(PROG, TiledHydraError(f"{where}{err.strerror or first_line(err)}"))


if __name__ == "__main__":
    cli()
