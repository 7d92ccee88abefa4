"""The study of one model: measure every resolution, fit the quadratics, write the run dir.

Files (written when complete; ``scaling.json`` last, atomically):
- ``scaling.json``: settings, every measurement, every fit, extrapolations, the max-resolution table;
- ``measurements.csv``: one row per resolution and component;
- ``fits.csv``: one row per fitted quantity (component or total);
- ``memory_components.png``, ``runtime_components.png``: paper 003 Fig. 2/4/6 and 3/5/7.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tiled_hydra.errors import ConfigError
from tiled_hydra.rundir import write_json_atomic
from tiled_hydra.scaling.fit import MAX_HOLDOUT_ERROR, MIN_R2, POOR, Quadratic, holdout_error, judge, verdict_of
from tiled_hydra.scaling.protocol import TimingProtocol, point_record, round_robin
from tiled_hydra.scaling.units import format_bytes, parse_bytes

log = logging.getLogger("tiled_hydra")

MODEL_ORDER = ("padim", "padim_ipca", "patchcore", "fastflow", "reverse_distillation", "efficient_ad", "ddad")
RESULT_FILE = "scaling.json"
#: totals that are fitted, beside every component's counted bytes and seconds
TOTALS = ("counted_bytes", "peak_bytes", "seconds")
#: process: each resolution in a fresh process (nothing inherited); none: every slot in this one
ISOLATION = ("process", "none")


def check_resolutions(values) -> list[int]:
    """A non-empty list of positive integer sides, sorted; one-line ConfigError otherwise."""
    if values is None or isinstance(values, (str, int, float)) or len(values) == 0:
        raise ConfigError(f"resolutions must be a non-empty list of image sides in px, e.g. resolutions=[256,512,768]; got {values}")
    sides = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
            raise ConfigError(f"resolutions must be positive integers (px); got {list(values)}")
        sides.append(int(v))
    if len(set(sides)) != len(sides):
        raise ConfigError(f"resolutions must not repeat; got {sides}")
    return sorted(sides)


def series(records: list[dict]) -> dict[tuple[str, str], list[float]]:
    """{(quantity, component or 'total'): values in resolution order}."""
    out: dict[tuple[str, str], list[float]] = {}
    for key in TOTALS:
        out[key, "total"] = [float(r[key]) for r in records]
    for name in records[0]["components"]:
        for key in ("state_bytes", "activation_bytes", "counted_bytes", "seconds"):
            out[key, name] = [float(r["components"][name][key]) for r in records]
    return out


def fit_thresholds(cfg: DictConfig) -> dict:
    t = {"min_r2": float(cfg.fit.min_r2), "max_holdout_error": float(cfg.fit.max_holdout_error)}
    if not 0 <= t["min_r2"] <= 1 or t["max_holdout_error"] < 0:
        raise ConfigError(f"fit: need 0 <= min_r2 <= 1 and max_holdout_error >= 0; got {t['min_r2']}, {t['max_holdout_error']}")
    return t


def fit_all(records: list[dict], extrapolate_to: list[int], thresholds: dict | None = None) -> list[dict]:
    """Non-negative quadratic, R^2, hold-out, verdict and extrapolation for every series; [] with
    fewer than 3 resolutions."""
    x = [r["resolution"] for r in records]
    if len(set(x)) < 3:
        return []
    t = thresholds or {"min_r2": MIN_R2, "max_holdout_error": MAX_HOLDOUT_ERROR}
    fits = []
    for (quantity, component), y in series(records).items():
        curve = Quadratic.fit(x, y)
        holdout = holdout_error(x, y)
        verdict, reasons = judge(curve.r2, holdout, t["min_r2"], t["max_holdout_error"])
        fits.append({"quantity": quantity, "component": component, **curve.as_dict(), "holdout": holdout,
                     "verdict": verdict, "verdict_reasons": reasons,
                     "extrapolated": {str(side): float(curve(side)) for side in extrapolate_to}})
    return fits


def fit_of(study: dict, quantity: str, component: str = "total") -> dict | None:
    return next((f for f in study.get("fits", []) if f["quantity"] == quantity and f["component"] == component), None)


def curve_of(study: dict, quantity: str, component: str = "total") -> Quadratic | None:
    f = fit_of(study, quantity, component)
    if f is None:
        return None
    return Quadratic(f["b0"], f["b1"], f["b2"], f["r2"], f["n_points"], f.get("floor", 0.0), f.get("floor_x", math.inf))


def verdict(study: dict, quantity: str, component: str = "total") -> tuple[str, list[str]]:
    """('good' | 'poor', reasons) of a study's fit, judged with the study's own thresholds."""
    f = fit_of(study, quantity, component)
    if f is None:
        return POOR, ["not fitted (fewer than 3 resolutions)"]
    return verdict_of(f, study.get("settings", {}).get("fit"))


def max_resolution_table(study: dict, memory_sizes: list[int], tile: int, bytes_per_pixel: float,
                         quantity: str = "counted_bytes") -> list[dict]:
    """Largest square side each memory size serves: one model at the full image vs a tiled ensemble.

    Tiled ensemble: one tile model is resident at a time, so its memory is the curve at the tile
    size; the image only adds ``bytes_per_pixel`` buffers (uint8 image + float32 merged map),
    whose side limit is sqrt((budget - tile model) / bytes_per_pixel).  Rows from a poor fit say so
    (``fit_verdict``).
    """
    curve = curve_of(study, quantity)
    if curve is None:
        return []
    fit_verdict = verdict(study, quantity)[0]
    tile_cost = float(curve(tile))
    bends_down = curve.b2 < 0 or (curve.b2 == 0 and curve.b1 < 0)  # only files fitted before the fits were non-negative
    rows = []
    for size in memory_sizes:
        single = None if bends_down else curve.largest_side(size, start=32)
        tiled = math.isqrt(int((size - tile_cost) / bytes_per_pixel)) if size > tile_cost else None
        rows.append({"model": study["model"], "memory_bytes": size, "memory": format_bytes(size), "quantity": quantity,
                     "single_model_side": single, "tiled_side": tiled, "tile_size": tile,
                     "tile_model_bytes": tile_cost, "concave_fit": bends_down, "fit_verdict": fit_verdict})
    return rows


def write_csvs(run_dir: Path, study: dict) -> None:
    with (run_dir / "measurements.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "backbone", "resolution", "component", "state_bytes", "activation_bytes",
                         "counted_bytes", "seconds", "peak_bytes_total", "peak_bytes_min", "peak_bytes_max",
                         "seconds_total", "seconds_q1", "seconds_q3", "seconds_min", "seconds_max", "timed_steps",
                         "noisy", "mem_kind"])
        for r in study["measurements"]:
            for name, c in r["components"].items():
                writer.writerow([study["model"], study["backbone"], r["resolution"], name, c["state_bytes"],
                                 c["activation_bytes"], c["counted_bytes"], f"{c['seconds']:.6f}", r["peak_bytes"],
                                 r["peak_bytes_min"], r["peak_bytes_max"], f"{r['seconds']:.6f}", f"{r['seconds_q1']:.6f}",
                                 f"{r['seconds_q3']:.6f}", f"{r['seconds_min']:.6f}", f"{r['seconds_max']:.6f}",
                                 r["timed_steps"], r["noisy"], r["mem_kind"]])
    with (run_dir / "fits.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        sides = study["settings"]["extrapolate_to"]
        writer.writerow(["model", "quantity", "component", "b0", "b1", "b2", "r2", "holdout_x",
                         "holdout_relative_error", "verdict", "verdict_reasons", *[f"at_{s}" for s in sides]])
        for fit in study["fits"]:
            h = fit["holdout"] or {}
            writer.writerow([study["model"], fit["quantity"], fit["component"], fit["b0"], fit["b1"], fit["b2"],
                             fit["r2"], h.get("x", ""), h.get("relative_error", ""), fit["verdict"],
                             "; ".join(fit["verdict_reasons"]), *[fit["extrapolated"][str(s)] for s in sides]])


def settings(cfg: DictConfig, device: torch.device, protocol: TimingProtocol, threads: dict) -> dict:
    net = cfg.model.net
    random_backbone = str(cfg.backbone.weights) == "none"
    isolation = str(cfg.isolation)
    if isolation not in ISOLATION:
        raise ConfigError(f"isolation={isolation}: choose one of {', '.join(ISOLATION)}")
    out = {
        "resolutions": check_resolutions(cfg.resolutions),
        "batch_size": 1,
        "n_train": int(cfg.n_train),
        "train_steps": int(cfg.train_steps),
        "device": device.type,
        "timing": protocol.as_dict(),
        "warmup": protocol.warmup,
        "repeats": protocol.repeats,
        "memory_steps": int(cfg.memory_steps),
        "isolation": isolation,
        "fit": fit_thresholds(cfg),
        "extrapolate_to": [int(s) for s in cfg.extrapolate_to],
        "tile_size": int(cfg.tile_size),
        "memory_sizes": [parse_bytes(s, "memory_sizes") for s in cfg.memory_sizes],
        "sensor_mp": [float(m) for m in cfg.sensor_mp],
        "tiled_bytes_per_pixel": float(cfg.tiled_bytes_per_pixel),
        "random_backbone_weights": random_backbone,
        "backbone_weights": str(cfg.backbone.weights),
        "model_config": OmegaConf.to_container(net, resolve=False),  # ${setup.tile_size} = each resolution
        "threads": threads,
        "torch_threads": threads["torch"],
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],  # timings on a shared machine: state the load
    }
    if out["memory_steps"] < 1:
        raise ConfigError(f"memory_steps={out['memory_steps']}: need at least 1")
    if "coreset_ratio" in net:
        out["coreset_ratio"] = float(net.coreset_ratio)
    return out


def open_benches(cfg: DictConfig, info: dict, device: torch.device, checkpoints: Path) -> list:
    """Every resolution's slot fitted, one after another (in its own process with ``isolation: process``)."""
    if info["isolation"] == "process":
        from tiled_hydra.scaling.isolation import RemoteBench

        make = lambda side: RemoteBench(cfg, side, device, checkpoints, info["threads"]["torch"])  # noqa: E731
    else:
        from tiled_hydra.build import build_frozen_backbone
        from tiled_hydra.scaling.measure import make_bench

        backbone = build_frozen_backbone(cfg, fold_batch_norm=False)  # the published architecture's layers are counted
        make = lambda side: make_bench(cfg, backbone, side, device, checkpoints)  # noqa: E731
    benches = []
    try:
        for side in info["resolutions"]:
            benches.append(make(side))
    except BaseException:
        for bench in benches:
            bench.close()
        raise
    return benches


def measure_points(cfg: DictConfig, info: dict, protocol: TimingProtocol, device: torch.device,
                   checkpoints: Path) -> tuple[list[dict], list[dict]]:
    """Fit every side, count and peak each right after its fit, then time them round-robin."""
    mem_kind = "cuda" if device.type == "cuda" else "rss"
    benches = open_benches(cfg, info, device, checkpoints)
    try:
        counted, peaks = {}, {}
        for bench in benches:
            counted[bench.resolution] = bench.count()
            bench.warm()  # lazy initialisation is not part of a step's peak
            peaks[bench.resolution] = [bench.peak() for _ in range(info["memory_steps"])]
        samples, rounds = round_robin(benches, protocol)
        records = []
        for bench in benches:
            side = bench.resolution
            record = point_record(bench.describe(), counted[side], peaks[side], samples[side], mem_kind,
                                  protocol.max_relative_iqr)
            records.append(record)
            log.info("%s %d px: counted %s, peak %s (%s), %.4g s/image (IQR %.4g-%.4g, %d steps)%s", cfg.model.name, side,
                     format_bytes(record["counted_bytes"]), format_bytes(record["peak_bytes"]), mem_kind,
                     record["seconds"], record["seconds_q1"], record["seconds_q3"], record["timed_steps"],
                     ", NOISY" if record["noisy"] else "")
        return records, rounds
    finally:
        for bench in benches:
            bench.close()


def run_study(cfg: DictConfig, run_dir: Path) -> dict:
    from tiled_hydra.build import resolve_device
    from tiled_hydra.scaling.isolation import pin_threads

    device = resolve_device(str(cfg.trainer.accelerator))
    protocol = TimingProtocol.from_cfg(cfg, device)
    threads = pin_threads(cfg.get("threads"))
    info = settings(cfg, device, protocol, threads)
    records, rounds = measure_points(cfg, info, protocol, device, run_dir / "checkpoints")
    study = {
        "study": "scaling",
        "model": str(cfg.model.name),
        "backbone": str(cfg.backbone.name),
        "settings": info,
        "components": list(records[0]["components"]),
        "measurements": records,
        "timing_rounds": rounds,
        "fits": fit_all(records, info["extrapolate_to"], info["fit"]),
    }
    from tiled_hydra.scaling.measure import PEAK_METHODS

    study["settings"]["peak_method"] = PEAK_METHODS[records[0]["peak_method"]]
    study["settings"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    study["max_resolution"] = [row for quantity in ("counted_bytes", "peak_bytes")
                               for row in max_resolution_table(study, info["memory_sizes"], info["tile_size"],
                                                               info["tiled_bytes_per_pixel"], quantity)]
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "checkpoints").is_dir() and not any((run_dir / "checkpoints").iterdir()):
        (run_dir / "checkpoints").rmdir()  # the slot store makes it; the study saves no slot
    write_csvs(run_dir, study)
    return study


def save_study(run_dir: Path, study: dict) -> None:
    """RUN_DIR/scaling.json, written last: its presence means the study completed."""
    write_json_atomic(Path(run_dir) / RESULT_FILE, study)


def find_studies(sources: list[str]) -> list[dict]:
    """Every completed study (scaling.json) below the given directories, one per (model, backbone)
    (the latest file wins)."""
    found: dict[tuple, dict] = {}
    for source in sources:
        path = Path(source)
        files = [path] if path.is_file() and path.name == RESULT_FILE else sorted(path.rglob(RESULT_FILE)) if path.is_dir() else []
        for file in sorted(files, key=lambda p: p.stat().st_mtime):
            study = json.loads(file.read_text())
            study["source"] = str(file.parent)
            found[study["model"], study["backbone"]] = study
    return sorted(found.values(), key=lambda s: (MODEL_ORDER.index(s["model"]) if s["model"] in MODEL_ORDER else 99, s["model"]))
