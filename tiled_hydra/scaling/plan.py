"""Tile plan for a memory budget, from paper 003's fitted curves (paper 000 meets paper 003).

    python -m tiled_hydra.plan model=patchcore image_size=[2048,2448] memory_budget=8GiB
    python -m tiled_hydra.plan model=padim image_size=4096 memory_budget=2GiB study=outputs/scaling_cpu objective=latency

A tiled ensemble holds one tile model at a time, so its peak memory is the fitted curve of one
model at the tile size (batch size 1; one tile per batch: ``model.batch_size=1``).  The curves
come from a study dir (``study=DIR``: a ``python -m tiled_hydra.scaling`` run or multirun) or are
measured on the spot at ``resolutions`` (small sides, a minute or two on a CPU).

Rules:
- candidates: the single model (tile = image), and square tiles from ``min_tile`` to the short
  image side in steps of ``tile_step`` px, stride = tile (``overlap=false``) or tile/2
  (``overlap=true``, as ENS9); tiles counted with the run's TileGrid (zero padding included);
- predicted peak: the fitted step peak of one model at the tile size, plus (``load_copy=true``)
  its state once more: a run reads a slot's checkpoint into memory and copies it into the model,
  so both exist while the slot loads;
- feasible: predicted peak x (1 + ``headroom``) <= budget;
- ``objective=accuracy``: the single model if feasible, else the largest feasible tile (most
  context per model; overlap as chosen);
- ``objective=latency``: the feasible plan with the lowest predicted time per image
  (tiles x time of one tile; ties go to the larger tile);
- non-square images use the curve at the side of the square with the same pixel count;
- a poor fit (see :func:`tiled_hydra.scaling.fit.judge`) is not planned from unless
  ``allow_poor_fit=true``: the memory curves always decide the plan, the time curve decides it with
  ``objective=latency`` (with ``objective=accuracy`` a poor time fit only marks the printed latency).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from tiled_hydra.errors import ConfigError
from tiled_hydra.scaling.fit import Quadratic
from tiled_hydra.scaling.units import format_bytes, parse_bytes
from tiled_hydra.core.tiling import TileGrid, as_pair

log = logging.getLogger("tiled_hydra")

OBJECTIVES = ("accuracy", "latency")
MEMORY_CURVES = ("max", "peak_bytes", "counted_bytes")


@dataclass
class UpperCurve:
    """The larger of several fitted curves at every side (the planner's default: a measured peak
    fitted on a noisy CPU can bend down, the Eq. 1-3 count misses functional temporaries), plus
    optional curves that add on top (the checkpoint copy of the state while a slot loads)."""

    curves: list[Quadratic]
    added: tuple = ()

    def __call__(self, x):
        return max(float(c(x)) for c in self.curves) + sum(float(c(x)) for c in self.added)


@dataclass
class Plan:
    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    stride: tuple[int, int]
    num_tiles: int
    predicted_bytes: float  # peak of one resident tile model
    predicted_seconds: float  # per image: all tiles one after another

    @property
    def single(self) -> bool:
        return self.num_tiles == 1 and self.tile_size == self.image_size

    def overrides(self, model: str, backbone: str) -> str:
        def size(v: tuple[int, int]) -> str:
            return str(v[0]) if v[0] == v[1] else f"[{v[0]},{v[1]}]"

        setup = "sm256" if self.single else "ens9"
        return (f"+setup={setup} model={model} backbone={backbone} setup.image_size={size(self.image_size)} setup.tile_size={size(self.tile_size)} "
                f"setup.stride={size(self.stride)} model.batch_size=1")


def equivalent_side(size: tuple[int, int]) -> float:
    """Side of the square with the same number of pixels (the curves are fitted on square images)."""
    return math.sqrt(size[0] * size[1])


def candidates(image_size: tuple[int, int], memory: Quadratic, seconds: Quadratic, overlap: bool,
               min_tile: int, tile_step: int) -> list[Plan]:
    plans = [Plan(image_size, image_size, image_size, 1, float(memory(equivalent_side(image_size))),
                  float(seconds(equivalent_side(image_size))))]
    for tile in range(min_tile, min(image_size) + 1, tile_step):
        if (tile, tile) == image_size:
            continue
        stride = max(1, tile // 2) if overlap else tile
        grid = TileGrid.create(image_size, tile, stride)
        plans.append(Plan(image_size, (tile, tile), (stride, stride), grid.num_tiles, float(memory(tile)),
                          grid.num_tiles * float(seconds(tile))))
    return plans


def choose(image_size, budget: int, memory: Quadratic, seconds: Quadratic, objective: str = "accuracy",
           overlap: bool = True, min_tile: int = 64, tile_step: int = 32, headroom: float = 0.1) -> Plan:
    """The plan for ``budget`` bytes (see the module docstring); ConfigError if nothing fits."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective}: choose one of {', '.join(OBJECTIVES)}")
    image_size = as_pair(image_size)
    if min(image_size) <= 0 or min_tile <= 0 or tile_step <= 0:
        raise ConfigError(f"image_size, min_tile and tile_step must be positive, got {list(image_size)}, {min_tile}, {tile_step}")
    plans = candidates(image_size, memory, seconds, overlap, min_tile, tile_step)
    need = lambda p: p.predicted_bytes * (1 + headroom)  # noqa: E731
    feasible = [p for p in plans if need(p) <= budget]
    if not feasible:
        best = min(plans, key=need)
        raise ConfigError(f"memory_budget={format_bytes(budget)} is below every plan; the smallest feasible budget is "
                          f"{format_bytes(need(best))} ({best.tile_size[0]} px tiles, {headroom:.0%} headroom)")
    if objective == "latency":
        return min(feasible, key=lambda p: (p.predicted_seconds, -p.tile_size[0]))
    single = [p for p in feasible if p.single]
    return single[0] if single else max(feasible, key=lambda p: (p.tile_size[0], -p.num_tiles))


# -- curves ----------------------------------------------------------------------------------------
def state_curve(study: dict) -> Quadratic:
    """Fitted parameter + buffer bytes of the whole slot: the sum of the components' state fits."""
    from tiled_hydra.scaling.study import curve_of

    parts = [curve_of(study, "state_bytes", name) for name in study["components"]]
    parts = [p for p in parts if p is not None]
    return Quadratic(sum(p.b0 for p in parts), sum(p.b1 for p in parts), sum(p.b2 for p in parts), 1.0, 0)


def study_curves(study: dict, memory_key: str = "max", load_copy: bool = False) -> tuple[UpperCurve, Quadratic]:
    """Memory and time curves of a study. ``load_copy``: add the slot's state once more, as a run
    holds it twice while it loads a slot from its checkpoint (file tensors + model buffers)."""
    from tiled_hydra.scaling.study import curve_of

    keys = ("peak_bytes", "counted_bytes") if memory_key == "max" else (memory_key,)
    curves = [curve_of(study, key) for key in keys]
    seconds = curve_of(study, "seconds")
    if None in curves or seconds is None:
        raise ConfigError(f"study {study.get('source')} has no fits (it needs at least 3 resolutions)")
    return UpperCurve(curves, (state_curve(study),) if load_copy else ()), seconds


def load_study(path: str, model: str, backbone: str) -> dict:
    from tiled_hydra.scaling.study import find_studies

    if not Path(path).exists():
        raise ConfigError(f"study={path}: no such directory (write one with python -m tiled_hydra.scaling)")
    studies = find_studies([path])
    match = [s for s in studies if s["model"] == model and s["backbone"] == backbone]
    if not match:
        have = ", ".join(f"{s['model']}/{s['backbone']}" for s in studies) or "no scaling.json"
        raise ConfigError(f"study={path} holds no study of model={model} backbone={backbone} (found: {have})")
    return match[0]


NAMES = {"peak_bytes": "measured-peak memory", "counted_bytes": "Eq. 1-3 memory", "seconds": "time"}


def deciding_fits(memory_key: str, objective: str) -> list[str]:
    """The fitted totals a plan rests on."""
    keys = ["peak_bytes", "counted_bytes"] if memory_key == "max" else [memory_key]
    return keys + (["seconds"] if objective == "latency" else [])


def poor_fits(study: dict, quantities: list[str]) -> list[str]:
    """'<quantity> (<reasons>)' for every poor fit among ``quantities``."""
    from tiled_hydra.scaling.study import verdict

    out = []
    for quantity in quantities:
        judged, reasons = verdict(study, quantity)
        if judged == "poor":
            out.append(f"{NAMES[quantity]} ({'; '.join(reasons)})")
    return out


def check_fits(study: dict, memory_key: str, objective: str, allow_poor_fit: bool) -> list[str]:
    """ConfigError when the plan would rest on a poor fit and ``allow_poor_fit`` is false; else the
    poor fits it rests on (empty when none)."""
    poor = poor_fits(study, deciding_fits(memory_key, objective))
    if poor and not allow_poor_fit:
        hint = " or plan with memory=counted_bytes" if memory_key != "counted_bytes" and not poor_fits(study, ["counted_bytes"]) else ""
        raise ConfigError(f"study {study.get('source')}: the plan would rest on a poor fit: {', '.join(poor)}; measure "
                          f"again (more resolutions, a quieter machine){hint}, or pass allow_poor_fit=true")
    return poor


def plan_from_cfg(cfg: DictConfig, run_dir: Path) -> tuple[Plan, dict]:
    budget = parse_bytes(cfg.memory_budget, "memory_budget")
    if cfg.image_size is None:
        raise ConfigError("image_size is required: image_size=2048 or image_size=[2048,2448]")
    memory_key = str(cfg.memory)
    if memory_key not in MEMORY_CURVES:
        raise ConfigError(f"memory={memory_key}: choose one of {', '.join(MEMORY_CURVES)}")
    if cfg.study:
        study = load_study(str(cfg.study), str(cfg.model.name), str(cfg.backbone.name))
    else:
        from tiled_hydra.scaling.study import check_resolutions, run_study, save_study

        check_resolutions(cfg.resolutions)
        log.info("no study=DIR given: measuring %s at %s px", cfg.model.name, list(cfg.resolutions))
        study = run_study(cfg, run_dir)
        save_study(run_dir, study)
        study["source"] = str(run_dir)
    if str(cfg.objective) not in OBJECTIVES:
        raise ConfigError(f"objective={cfg.objective}: choose one of {', '.join(OBJECTIVES)}")
    study["poor_fits_used"] = check_fits(study, memory_key, str(cfg.objective), bool(cfg.get("allow_poor_fit", False)))
    memory, seconds = study_curves(study, memory_key, bool(cfg.load_copy))
    plan = choose(cfg.image_size, budget, memory, seconds, str(cfg.objective), bool(cfg.overlap), int(cfg.min_tile),
                  int(cfg.tile_step), float(cfg.headroom))
    return plan, study


def describe(plan: Plan, study: dict, cfg: DictConfig) -> str:
    s = study["settings"]
    measured = f"measured peak ({study['measurements'][0]['mem_kind']})"
    kind = {"peak_bytes": measured, "counted_bytes": "Eq. 1-3 count", "max": f"larger of Eq. 1-3 count and {measured}"}
    kind = kind[str(cfg.memory)] + (" + the state's checkpoint copy while a slot loads" if cfg.load_copy else "")
    lines = [
        f"plan for {cfg.model.name} ({cfg.backbone.name}), image {plan.image_size[0]}x{plan.image_size[1]}, "
        f"budget {format_bytes(parse_bytes(cfg.memory_budget))}, objective={cfg.objective}:",
        "  single model" if plan.single else
        f"  tile {plan.tile_size[0]} px, stride {plan.stride[0]} px -> {plan.num_tiles} tiles, {plan.num_tiles} models",
        f"  predicted peak memory: {format_bytes(plan.predicted_bytes)} ({kind}, one model resident, batch size 1)",
        f"  predicted latency: {plan.predicted_seconds:.3f} s per image ({s['device']}, tiles one after another"
        + (f"; from a poor fit: {', '.join(poor_fits(study, ['seconds']))}" if poor_fits(study, ["seconds"]) else "") + ")",
        f"  curves: {study.get('source')} (resolutions {s['resolutions']} px, n_train={s['n_train']}"
        + (f", coreset_ratio={s['coreset_ratio']}" if "coreset_ratio" in s else "") + ")",
        f"  run: python -m tiled_hydra {plan.overrides(str(cfg.model.name), str(cfg.backbone.name))}",
    ]
    if study.get("poor_fits_used"):
        lines.append(f"  warning: planned from poor fits (allow_poor_fit=true): {', '.join(study['poor_fits_used'])}")
    return "\n".join(lines)
