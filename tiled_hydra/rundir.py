"""The run directory: who may write it (a lock), which configuration it belongs to (a
fingerprint), and atomic writes with unique temporary names.

A run directory belongs to one configuration, identified by the fingerprint of every setting
that changes a slot's weights or the run's results.  A job whose fingerprint differs from the
one already in the directory (in its slot records or its results.json) is refused before it
writes anything, with the differing keys named.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tiled_hydra import __version__
from tiled_hydra.errors import ConfigError

# Config sections that determine a slot's weights, the predictions or the reported numbers
# (the run's fingerprint, in results.json) ...
IDENTITY_SECTIONS = ("dataset", "backbone", "model", "setup", "seed", "trainer", "inference", "merge", "metrics", "speed")
# ... and those that determine a slot's weights (the slots' fingerprint, in checkpoints and slot
# records): trained slots are reused by an evaluation with other merge, metrics or speed settings
# (ensemble.stage=evaluate in a new run dir, ensemble.checkpoint_dir shared).
SLOT_SECTIONS = ("dataset", "backbone", "model", "setup", "seed", "trainer", "inference")
# Keys of those sections that change no reported number (sweeps re-run with speed.enabled=false
# find their finished jobs again, see conf/sweep/_job_dirs.yaml).
NEUTRAL_KEYS = {"speed.enabled"}
# Trainer keys that change nothing in the weights: where they run, and what Lightning prints.
TRAINER_NEUTRAL_KEYS = {"accelerator", "devices", "logger", "enable_checkpointing", "enable_progress_bar",
                        "enable_model_summary", "num_sanity_val_steps", "log_every_n_steps", "default_root_dir"}
# inference.* keys that change the predictions (per_tile vs whole_image backbone features).
INFERENCE_KEYS = {"features"}
MAX_NAMED_KEYS = 4


def flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out |= flatten(sub, f"{prefix}.{key}")
        return out
    return {prefix: value}


def identity(cfg: DictConfig, sections: tuple[str, ...] = IDENTITY_SECTIONS) -> dict:
    """{dotted key: value} of every setting the run's fingerprint covers (resolved)."""
    out = {"version": __version__}
    for section in sections:
        node = cfg.get(section)
        if node is None:
            continue
        value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        if section == "trainer":
            value = {k: v for k, v in value.items() if k not in TRAINER_NEUTRAL_KEYS}
        if section == "inference":  # mode and chunking change how, not what, is computed
            value = {k: v for k, v in value.items() if k in INFERENCE_KEYS}
        out |= flatten(value, section)
    return {k: v for k, v in out.items() if k not in NEUTRAL_KEYS}


def slot_identity(cfg: DictConfig) -> dict:
    """{dotted key: value} of every setting that changes a slot's weights."""
    return identity(cfg, SLOT_SECTIONS)


def fingerprint_of(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that determines the run's results, to refuse mixing two runs."""
    return fingerprint_of(identity(cfg))


def slot_fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that determines a slot's weights, to refuse mixing slots of two configurations."""
    return fingerprint_of(slot_identity(cfg))


def differing_keys(old: dict, new: dict) -> str:
    """'model.name padim -> patchcore, seed 0 -> 1' (the first few), for a one-line message."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"{k} {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys[:MAX_NAMED_KEYS]]
    more = f" and {len(keys) - MAX_NAMED_KEYS} more" if len(keys) > MAX_NAMED_KEYS else ""
    return ", ".join(shown) + more if keys else "the code version"


def mismatch_error(what: Path, run_dir: Path, old_identity: dict | None, new_identity: dict,
                   shared_dir: Path | None = None) -> ConfigError:
    differs = differing_keys(old_identity, new_identity) if old_identity else "unknown settings (written by an older version)"
    fix = (f"use another ensemble.checkpoint_dir or delete {shared_dir}" if shared_dir
           else f"use a new hydra.run.dir or delete {run_dir}")
    return ConfigError(f"{what} belongs to another configuration ({differs}); {fix}")


# -- where the slots live -------------------------------------------------------------------------
def checkpoint_dir(cfg: DictConfig, run_dir: Path) -> Path:
    """ensemble.checkpoint_dir (shared by the shards of one run, absolute), else RUN_DIR/checkpoints."""
    shared = OmegaConf.select(cfg, "ensemble.checkpoint_dir")
    return Path(str(shared)).expanduser().resolve() if shared else Path(run_dir) / "checkpoints"


# -- atomic files ---------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write through a uniquely named temporary file in the same directory, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results unreadable to the group
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    # top-level keys sorted; nested mappings keep their order (region_recall_by_size: smallest bin first)
    write_atomic(path, json.dumps({k: payload[k] for k in sorted(payload)}, indent=2))


def temp_path(path: Path) -> Path:
    """A fresh, unique temporary name next to ``path`` (for writers that need a path, e.g. torch.save)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


# -- locks ---------------------------------------------------------------------------------------
class PidLock:
    """Exclusive flock on a file that holds the owner's pid (released by the OS if it dies).

    Busy: ``on_busy(pid)`` is called; it raises to give up, or returns to wait for the lock.
    """

    def __init__(self, path: Path, on_busy):
        self.path, self.on_busy, self.file = Path(path), on_busy, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            try:
                self.on_busy(pid)
            except BaseException:
                self.file.close()
                raise
            fcntl.flock(self.file, fcntl.LOCK_EX)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.file.seek(0)
        self.file.truncate()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class RunDirLock(PidLock):
    """RUN_DIR/.lock for the life of a job: a second job in the directory is refused."""

    def __init__(self, run_dir: Path):
        def refuse(pid: str) -> None:
            raise ConfigError(f"{Path(run_dir)} is in use by pid {pid}; wait for it or use another hydra.run.dir")

        super().__init__(Path(run_dir) / ".lock", refuse)


# -- what a finished run left ---------------------------------------------------------------------
def check_slot_records(checkpoint_dir: Path, ident: dict, shared: bool = False) -> dict | None:
    """Refuse slot records and checkpoints of another configuration; return the identity the
    directory's slots were trained with (None when it has none).  ``shared``: an
    ensemble.checkpoint_dir, named as such in the error."""
    fingerprint, found = fingerprint_of(ident), None
    shared_dir = Path(checkpoint_dir) if shared else None
    for path in sorted(Path(checkpoint_dir).glob("slot_*.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue  # damaged record: that slot is trained again
        if record.get("fingerprint") != fingerprint:
            raise mismatch_error(path, checkpoint_dir.parent, record.get("identity"), ident, shared_dir)
        found = record.get("identity")
    for path in sorted(Path(checkpoint_dir).glob("slot_*.pt")):
        if path.with_suffix(".json").exists():
            continue
        # A checkpoint without its record (older version, or killed between the two writes).
        import torch

        try:
            other = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("fingerprint")
        except Exception:
            continue  # damaged: that slot is trained again
        if other != fingerprint:
            raise mismatch_error(path, checkpoint_dir.parent, None, ident, shared_dir)
    return found


def check_results(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The results of a finished run of this very configuration, or None when there are none.

    Results (results.json, or a training-only job's shard.json) of another configuration are
    refused (ConfigError), never returned or overwritten; the keys that differ are read from
    the run dir's .hydra/config.yaml.
    """
    new = identity(cfg)
    found = {}
    for name in ("results.json", "shard.json"):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            found[name] = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path} is damaged (not JSON); delete it to run again") from None
        if found[name].get("fingerprint") != fingerprint_of(new):
            raise mismatch_error(path, run_dir, saved_identity(run_dir), new)
    return found.get("results.json")


def saved_identity(run_dir: Path) -> dict | None:
    """The identity of the configuration saved in RUN_DIR/.hydra/config.yaml, if readable."""
    try:
        return identity(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml"))
    except Exception:
        return None


def save_config(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """RUN_DIR/.hydra/config.yaml (resolved) and overrides.yaml of the job that owns the directory.

    Hydra's own copy is switched off (hydra.output_subdir=null): Hydra would write it at job
    start, before this job knows whether the directory is free and of its configuration.
    """
    target = run_dir / ".hydra"
    target.mkdir(parents=True, exist_ok=True)
    write_atomic(target / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_atomic(target / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
