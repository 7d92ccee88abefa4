"""Run records shared by ``tiled_hydra.compare`` (tables) and ``tiled_hydra.analysis.figures`` (figures).

A record is one finished run: its results keys, image/tile size and study from its config,
and ``settings`` (its flattened configuration).  Runs that share an identity (dataset,
category, setup, model, seed) but differ in some other setting are *variants*; the keys they
differ in become part of their column name, as Hydra names a job directory by its overrides
(``model.net.n_features=20``).  Only runs with the same fingerprint are duplicates.
"""

from __future__ import annotations

from collections import defaultdict

from tiled_hydra.errors import ConfigError

PAPER_SETUPS = ("sm256", "sm512", "st4", "st9", "ens4", "ens9")  # row order of paper Tables 1-2
PAPER_MODELS = ("patchcore", "padim", "fastflow", "reverse_distillation")  # column order
TABLE_METRICS = ("image_AUROC", "pixel_AUPRO")
IDENTITY_KEYS = ("dataset", "category", "setup", "model", "seed")
RESOLUTION_STUDY = "resolution"
# Settings that never tell two runs' results apart (where things are stored, what is printed).
NEUTRAL_PREFIXES = ("logger.", "hydra.", "dataset.root", "backbone.weights", "report.", "study")
NEUTRAL_KEYS = {"skip_completed", "keep_checkpoints", "progress", "speed.enabled"}


class CompareError(ConfigError):
    """A bad source or option: the message is the one line the user sees."""


def paper_order(values, preferred) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def side(size) -> int | None:
    """Image or tile size as one number (the longer side for [h, w])."""
    if size is None:
        return None
    return int(size) if isinstance(size, (int, float)) else max(int(s) for s in size)


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, sub in value.items():
            out |= flatten(sub, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: value}


def settings_of(config: dict) -> dict:
    """{dotted key: value} of a run's configuration, without the keys that change no result."""
    return {k: v for k, v in flatten(config).items()
            if k not in NEUTRAL_KEYS and not k.startswith(NEUTRAL_PREFIXES)}


def make_run(results: dict, config: dict, source: str) -> dict:
    """One flat record: the results keys plus image/tile size, study and settings from the run's config."""
    setup = config.get("setup") or {}
    run = dict(results)
    run.setdefault("image_size", side(setup.get("image_size")))
    run.setdefault("tile_size", side(setup.get("tile_size")))
    run.setdefault("stride", side(setup.get("stride")))
    run["study"] = config.get("study") or results.get("study") or ""
    run["settings"] = settings_of(config)
    if results.get("backbone") is not None:
        run["settings"].setdefault("backbone.name", results["backbone"])
    run["source"] = source
    return run


def identity_of(run: dict) -> tuple:
    return tuple(str(run.get(k)) for k in (*IDENTITY_KEYS, "study", "image_size", "tile_size", "stride"))


def varying_keys(runs: list[dict]) -> list[str]:
    """Settings in which runs of the same identity differ: what a sweep varied besides the grid."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[identity_of(run)].append(run)
    keys: set[str] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        every = set().union(*(m.get("settings", {}) for m in members))
        keys |= {k for k in every if len({repr(m.get("settings", {}).get(k)) for m in members}) > 1}
    return sorted(keys)


def format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(format_value, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def label_variants(runs: list[dict]) -> list[str]:
    """Set run['variant'] (``key=value,key=value`` over the varying keys, '' when none); returns the keys."""
    keys = varying_keys(runs)
    # A group chosen by name (backbone=resnet18) is named by its choice, not by every key it sets.
    named = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".name")}
    shown = [k for k in keys if k.rsplit(".", 1)[0] not in named or k.endswith(".name")]
    for run in runs:
        settings = run.get("settings", {})
        run["variant"] = ",".join(f"{k.removesuffix('.name') if k.removesuffix('.name') in named else k}="
                                  f"{format_value(settings[k])}" for k in shown if k in settings)
    return [k.removesuffix(".name") if k.removesuffix(".name") in named else k for k in shown]
