"""Check the whole composed configuration before any data loads: types, ranges, choices.

Every problem is one ``ConfigError`` line naming the key, what it got and what it accepts.
Keys passed to a ``_target_`` (model.net, dataset, backbone) are checked against the
target's annotated signature, so a new model or dataset is covered without a schema here.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from tiled_hydra.errors import ConfigError

def _conf_dir() -> Path:
    """The config groups: inside the installed package (the wheel ships conf/ as tiled_hydra/conf), or
    the checkout's top-level conf/ (editable install, or run from a clone)."""
    package = Path(__file__).resolve().parent
    return package / "conf" if (package / "conf").is_dir() else package.parent / "conf"


CONF_DIR = _conf_dir()
# Lightning.Trainer keys the model decides (conf/model/*.yaml): a duplicate would be a TypeError.
MODEL_OWNED_TRAINER_KEYS = ("max_epochs", "max_steps")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MERGE_SCORES = ("mean", "max")
LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
PROGRESS = (True, False, "auto")
ENSEMBLE_STAGES = ("all", "train", "evaluate")


def group_options(group: str) -> list[str]:
    """Options of a config group the user may choose (internal ones start with ``_``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def user_groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and not p.name.startswith("_"))


# -- value checks ------------------------------------------------------------------------------
def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _show(value) -> str:
    return repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(cfg: DictConfig, key: str, low: int | None = None, allowed: tuple = ()) -> None:
    value = _get(cfg, key)
    if value in allowed and _is_int(value):
        return
    if not _is_int(value) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        raise ConfigError(f"{key}={_show(value)}: expected an integer{bound}{extra}")


def check_number(cfg: DictConfig, key: str, low: float, high: float, low_open: bool = False) -> None:
    value = _get(cfg, key)
    if not _is_number(value) or value > high or value < low or (low_open and value == low):
        raise ConfigError(f"{key}={_show(value)}: expected a number in {'(' if low_open else '['}{low}, {high}]")


def check_bool(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={_show(value)}: expected true or false")


def check_choice(cfg: DictConfig, key: str, choices: Sequence) -> None:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={_show(value)}: expected one of {', '.join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)}")


def check_size(cfg: DictConfig, key: str) -> None:
    """A side length in pixels: a positive integer or [height, width]."""
    value = _get(cfg, key)
    parts = list(value) if isinstance(value, ListConfig) else [value]
    if len(parts) not in (1, 2) or not all(_is_int(p) and p > 0 for p in parts):
        raise ConfigError(f"{key}={_show(value)}: expected a positive integer or [height, width] in pixels")


# -- _target_ signatures ------------------------------------------------------------------------------
def _matches(value, hint) -> bool:
    if hint is inspect.Parameter.empty or hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, (DictConfig, dict))
    return True  # a type this check does not know: leave it to the target


def _describe(hint) -> str:
    text = str(hint).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def check_target(cfg: DictConfig, key: str, passed_at_run_time: tuple[str, ...] = ()) -> None:
    """Keys of a ``_target_`` node must be parameters of the target, with values of their types."""
    node = _get(cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    module_name, _, name = str(node._target_).rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{key}._target_={node._target_}: no such class or function") from None
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: check the names only
        hints = {}
    params = signature.parameters
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for sub, value in node.items():
        if sub.startswith("_"):
            continue
        if sub not in params:
            if not open_kwargs:
                known = ", ".join(p for p in params if p not in ("self", "backbone", *passed_at_run_time))
                raise ConfigError(f"{key}.{sub}: not a setting of {name} (its settings: {known})")
            continue
        hint = hints.get(sub, params[sub].annotation)
        if isinstance(hint, str):
            continue
        if not _matches(value, hint):
            raise ConfigError(f"{key}.{sub}={_show(value)}: expected {_describe(hint)}")


def check_trainer(cfg: DictConfig) -> None:
    import lightning as L

    params = inspect.signature(L.Trainer.__init__).parameters
    for key in cfg.trainer:
        if key in MODEL_OWNED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key}: set by the model, use model.{key}=... instead")
        if key not in params:
            raise ConfigError(f"trainer.{key}: not a lightning.Trainer argument")
    check_choice(cfg, "trainer.accelerator", ACCELERATORS)
    from lightning.fabric.connector import _PRECISION_INPUT_STR

    legacy = (16, 32, 64, "16", "32", "64", "bf16")  # Lightning still accepts these short forms
    check_choice(cfg, "trainer.precision", (*typing.get_args(_PRECISION_INPUT_STR), *legacy))
    value = _get(cfg, "trainer.devices")
    if value is not None and value != 1 and value != "auto":
        raise ConfigError(f"trainer.devices={_show(value)}: slots train one at a time on one device; expected 1")


def check_metrics(cfg: DictConfig) -> None:
    from tiled_hydra.metrics.pixel import parse_size

    check_number(cfg, "metrics.aupro_fpr_limit", 0.0, 1.0, low_open=True)
    check_number(cfg, "metrics.strict_fpr_limit", 0.0, 1.0, low_open=True)
    check_number(cfg, "metrics.region_overlap", 0.0, 1.0, low_open=True)
    resolution = _get(cfg, "metrics.resolution")
    if not (isinstance(resolution, str) and resolution in ("auto", "native", "setup")):
        parse_size(resolution, "metrics.resolution")
    parse_size(_get(cfg, "metrics.fallback_resolution"), "metrics.fallback_resolution")
    bins = _get(cfg, "metrics.region_size_bins")
    values = list(bins) if isinstance(bins, ListConfig) else None
    if not values or not all(_is_number(v) and 0 < v < 1 for v in values) or values != sorted(set(values)):
        raise ConfigError(f"metrics.region_size_bins={_show(bins)}: expected increasing shares of the image in (0, 1), "
                          "e.g. [0.0001, 0.001, 0.01]")


def check_ensemble(cfg: DictConfig) -> None:
    if _get(cfg, "ensemble") is None:
        return
    check_int(cfg, "ensemble.num_shards", 1)
    check_choice(cfg, "ensemble.stage", ENSEMBLE_STAGES)
    shard, num_shards, stage = _get(cfg, "ensemble.shard"), _get(cfg, "ensemble.num_shards"), _get(cfg, "ensemble.stage")
    if shard is not None and (not _is_int(shard) or not 0 <= shard < num_shards):
        raise ConfigError(f"ensemble.shard={_show(shard)}: expected null or an integer in [0, {num_shards}) "
                          f"(ensemble.num_shards={num_shards})")
    if shard is not None and stage == "evaluate":
        raise ConfigError("ensemble.shard with ensemble.stage=evaluate: a shard only trains; evaluate without ensemble.shard")
    if _get(cfg, "ensemble.workers") is not None:
        check_int(cfg, "ensemble.workers", 1)
        if _get(cfg, "ensemble.workers") > 1 and (shard is not None or stage == "train"):
            raise ConfigError("ensemble.workers > 1 trains and evaluates one run on this machine; a training-only or shard "
                              "job (ensemble.shard, ensemble.stage=train) takes ensemble.workers=1")
    directory = _get(cfg, "ensemble.checkpoint_dir")
    if directory is not None and (not isinstance(directory, str) or not directory.strip()):
        raise ConfigError(f"ensemble.checkpoint_dir={_show(directory)}: expected a directory path or null")


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError line for the first problem; return quietly when the config is usable."""
    if _get(cfg, "setup") is None:
        raise ConfigError(f"no setup chosen: add +setup=NAME, NAME one of {', '.join(group_options('setup'))}")
    check_int(cfg, "seed", 0)
    for key in ("setup.image_size", "setup.tile_size", "setup.stride"):
        check_size(cfg, key)
    check_bool(cfg, "setup.shared")
    check_int(cfg, "model.batch_size", 1)
    check_int(cfg, "model.max_epochs", 1, allowed=(-1,))
    check_int(cfg, "model.max_steps", 1, allowed=(-1,))
    check_choice(cfg, "merge.score", MERGE_SCORES)
    check_bool(cfg, "merge.seam_smoothing.enabled")
    check_number(cfg, "merge.seam_smoothing.sigma", 0.0, 1e6, low_open=True)
    check_number(cfg, "merge.seam_smoothing.width_fraction", 0.0, 0.5)
    check_metrics(cfg)
    check_int(cfg, "report.overlays", 0)
    check_bool(cfg, "speed.enabled")
    check_int(cfg, "speed.warmup", 0)
    check_int(cfg, "speed.repeats", 1)
    check_int(cfg, "speed.batch_size", 1)
    for key in ("skip_completed", "keep_checkpoints"):
        if _get(cfg, key) is not None:
            check_bool(cfg, key)
    if _get(cfg, "progress") is not None:
        check_choice(cfg, "progress", PROGRESS)
    check_ensemble(cfg)
    check_choice(cfg, "logger.backend", LOGGER_BACKENDS)
    if cfg.logger.backend == "wandb":
        check_choice(cfg, "logger.mode", LOGGER_MODES)
    check_trainer(cfg)
    check_target(cfg, "model.net")
    check_target(cfg, "dataset", passed_at_run_time=("image_size",))
