"""Scaling fits that respect what they fit, their verdicts, the planner's refusal of a poor fit, and
the round-robin timing protocol (tiled_hydra/scaling/fit.py, protocol.py, study.py, plan.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tiled_hydra.errors import ConfigError
from tiled_hydra.scaling.fit import Quadratic, holdout_error, judge
from tiled_hydra.scaling.protocol import TimingProtocol, point_record, round_robin

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
SIDES = [256, 384, 512, 640, 768, 1024]
# A user's measurement on a loaded 2-core machine: 46, 98, 1877, 300 ms at 256-640 px (512 px caught a load spike)
USER_SIDES, USER_SECONDS = [256, 384, 512, 640], [0.046, 0.098, 1.877, 0.300]


def compose_named(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


# -- fits -------------------------------------------------------------------------------------------
def test_a_spike_cannot_bend_the_fit_down():
    # Unconstrained least squares turns the spike into a negative leading coefficient: negative times beyond 1000 px.
    assert np.polyfit(USER_SIDES, USER_SECONDS, 2)[0] < 0
    curve = Quadratic.fit(USER_SIDES, USER_SECONDS)
    assert min(curve.b0, curve.b1, curve.b2) >= 0
    xs = np.arange(1, 3001)
    assert np.all(np.diff(curve(xs)) >= 0)  # never decreasing as the image grows
    assert curve(2000) >= max(USER_SECONDS) and curve(3000) >= max(USER_SECONDS)  # never below the largest measured
    verdict, reasons = judge(curve.r2, holdout_error(USER_SIDES, USER_SECONDS))
    assert verdict == "poor" and reasons[0].startswith("R^2")


def test_one_outlier_among_six_points_keeps_the_fit_non_negative_and_monotone():
    x = np.array(SIDES, dtype=float)
    y = 0.01 + 2e-7 * x**2  # a quadratic time per image (s)
    clean = Quadratic.fit(x, y)
    assert (clean.b0, clean.b1, clean.b2) == pytest.approx((0.01, 0.0, 2e-7), rel=1e-6, abs=1e-12)
    assert judge(clean.r2, holdout_error(x, y)) == ("good", [])
    spiked = y.copy()
    spiked[2] *= 20  # 512 px: 1.06 s instead of 0.063 s
    curve = Quadratic.fit(x, spiked)
    assert min(curve.b0, curve.b1, curve.b2) >= 0
    assert np.all(np.diff(curve(np.arange(1, 3001))) >= 0)
    assert judge(curve.r2, holdout_error(x, spiked))[0] == "poor"


def test_a_fit_without_a_hold_out_is_not_good():
    x, y = [256, 384, 512], [1.0, 2.25, 4.0]  # exact, but three points leave nothing to test it with
    curve = Quadratic.fit(x, y)
    assert curve.r2 == pytest.approx(1.0)
    assert judge(curve.r2, holdout_error(x, y)) == ("poor", ["no hold-out check (needs at least 4 sides)"])


# -- a study whose time fit is poor: console, json, csv, figure -------------------------------------------
def synthetic_study(seconds: dict[int, float], peak_spike: float = 1.0) -> dict:
    """A study made by the study's own record and fit functions from given medians: memory exactly
    quadratic (counted), measured peak 0.8 x counted (x ``peak_spike`` at 512 px)."""
    from tiled_hydra.scaling.study import fit_all

    records = []
    for side, median in seconds.items():
        counted = {"state": {"backbone": 4_000_000, "whitening": 40 * side**2, "other": 0},
                   "activation": {"backbone": 60 * side**2, "whitening": 4 * side**2, "other": 0}}
        samples = [{"seconds": median * f, "components": {"backbone": 0.6 * median * f, "whitening": 0.3 * median * f, "other": 0.0}}
                   for f in (0.99, 1.0, 1.01)]
        peak = 0.8 * (4_000_000 + 104 * side**2) * (peak_spike if side == 512 else 1.0)
        info = {"resolution": side, "state_made_by": "fitted on 8 generated images", "fit_seconds": 0.0, "peak_method": "hwm"}
        records.append(point_record(info, counted, [int(peak)], samples, "rss", 0.1))
    settings = {"resolutions": list(seconds), "device": "cpu", "warmup": 2, "repeats": 3, "n_train": 8,
                "timing": {"warmup": 2, "repeats": 3, "max_relative_iqr": 0.1, "max_extra_rounds": 6},
                "threads": {"torch": 1}, "torch_threads": 1, "fit": {"min_r2": 0.98, "max_holdout_error": 0.15},
                "extrapolate_to": [2000, 3000], "random_backbone_weights": True, "isolation": "process",
                "peak_method": "kernel high-water mark", "load_average_at_start": [1.0, 1.0, 1.0],
                "load_average_at_end": [1.0, 1.0, 1.0], "memory_sizes": [8 * 2**30], "sensor_mp": [5], "tile_size": 256,
                "tiled_bytes_per_pixel": 7.0}
    return {"study": "scaling", "model": "padim", "backbone": "efficientnet_lite0", "settings": settings,
            "components": ["backbone", "whitening", "other"], "measurements": records,
            "fits": fit_all(records, [2000, 3000], settings["fit"])}


SPIKED = dict(zip(SIDES, [0.046, 0.098, 1.877, 0.300, 0.45, 0.80]))
QUADRATIC = {side: 0.01 + 2e-7 * side**2 for side in SIDES}


def total_fit(study: dict, quantity: str) -> dict:
    return next(f for f in study["fits"] if f["quantity"] == quantity and f["component"] == "total")


def test_a_poor_fit_is_said_in_the_console_the_json_the_csv_and_the_figure(tmp_path, capsys):
    from tiled_hydra.cli.scaling import print_summary
    from tiled_hydra.scaling.figures import runtime_figure, memory_figure
    from tiled_hydra.scaling.study import save_study, write_csvs

    study = synthetic_study(SPIKED)
    assert total_fit(study, "seconds")["verdict"] == "poor"
    assert total_fit(study, "counted_bytes")["verdict"] == "good"  # Eq. 1-3 is exactly quadratic here
    print_summary(study)
    poor_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("poor fit:")]
    assert len(poor_lines) == 1 and poor_lines[0].startswith("poor fit: time per image: R^2")
    write_csvs(tmp_path, study)
    save_study(tmp_path, study)
    saved = total_fit(json.loads((tmp_path / "scaling.json").read_text()), "seconds")
    assert saved["verdict"] == "poor" and saved["verdict_reasons"]
    assert min(saved["b0"], saved["b1"], saved["b2"]) >= 0 and saved["extrapolated"]["3000"] >= 1.877
    rows = (tmp_path / "fits.csv").read_text().splitlines()
    assert any(r.startswith("padim,seconds,total,") and ",poor," in r for r in rows)
    fig = runtime_figure(study)
    fit_lines = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("time:")]
    assert len(fit_lines) == 1 and "poor fit" in fit_lines[0].get_label() and fit_lines[0].get_linestyle() == "--"
    fig = memory_figure(study)
    counted = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("Eq. 1-3")]
    assert counted[0].get_linestyle() == "-" and "poor fit" not in counted[0].get_label()


def test_a_good_study_draws_solid_fits():
    from tiled_hydra.scaling.figures import runtime_figure

    study = synthetic_study(QUADRATIC)
    assert {f["verdict"] for f in study["fits"] if f["component"] == "total"} == {"good"}
    line = next(line for line in runtime_figure(study).axes[0].get_lines() if line.get_label().startswith("time:"))
    assert line.get_linestyle() == "-" and "poor fit" not in line.get_label()


# -- the planner refuses a poor fit ------------------------------------------------------------------
def write_study(root: Path, study: dict) -> Path:
    from tiled_hydra.scaling.study import save_study

    (root / "job").mkdir(parents=True)
    save_study(root / "job", study)
    return root


def test_the_planner_refuses_a_poor_fit_without_the_flag(tmp_path):
    from tiled_hydra.scaling.plan import describe, plan_from_cfg

    study = synthetic_study(QUADRATIC, peak_spike=3.0)  # measured peak: a spike at 512 px
    assert total_fit(study, "peak_bytes")["verdict"] == "poor" and total_fit(study, "counted_bytes")["verdict"] == "good"
    root = write_study(tmp_path / "spiked", study)
    base = ["model=padim", "image_size=1024", "memory_budget=8GiB", f"study={root}"]
    with pytest.raises(ConfigError) as err:
        plan_from_cfg(compose_named("plan", base), tmp_path / "run")
    text = str(err.value)
    assert "\n" not in text and "poor fit: measured-peak memory (" in text and "allow_poor_fit=true" in text
    assert "memory=counted_bytes" in text  # the counted curve is good: offered instead
    cfg = compose_named("plan", [*base, "allow_poor_fit=true"])
    plan, used = plan_from_cfg(cfg, tmp_path / "run")
    assert "warning: planned from poor fits (allow_poor_fit=true): measured-peak memory" in describe(plan, used, cfg)
    cfg = compose_named("plan", [*base, "memory=counted_bytes"])
    plan, used = plan_from_cfg(cfg, tmp_path / "run")
    assert "warning" not in describe(plan, used, cfg)


def test_a_poor_time_fit_blocks_only_a_latency_plan(tmp_path):
    from tiled_hydra.scaling.plan import describe, plan_from_cfg

    root = write_study(tmp_path / "slow", synthetic_study(SPIKED))
    base = ["model=padim", "image_size=1024", "memory_budget=8GiB", f"study={root}"]
    with pytest.raises(ConfigError) as err:
        plan_from_cfg(compose_named("plan", [*base, "objective=latency"]), tmp_path / "run")
    assert "poor fit: time (R^2" in str(err.value)
    cfg = compose_named("plan", base)  # objective=accuracy: memory decides, the latency line says where it came from
    plan, used = plan_from_cfg(cfg, tmp_path / "run")
    assert "s per image (cpu, tiles one after another; from a poor fit: time (R^2" in describe(plan, used, cfg)


def test_the_plan_command_refuses_in_one_line(tmp_path):
    root = write_study(tmp_path / "spiked", synthetic_study(QUADRATIC, peak_spike=3.0))
    result = subprocess.run([sys.executable, "-m", "tiled_hydra.plan", "model=padim", "image_size=1024", "memory_budget=8GiB",
                             f"study={root}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2  # a ConfigError: the user can fix it
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiled_hydra.plan: error: study ") and "poor fit" in lines[0]


# -- round-robin timing -----------------------------------------------------------------------------------
class Clocked:
    """A bench whose steps take the given seconds, in turn; every call goes to a shared log."""

    def __init__(self, resolution: int, seconds: list[float], log: list):
        self.resolution, self.seconds, self.log, self.calls = resolution, seconds, log, 0

    def warm(self) -> None:
        self.log.append(("warm", self.resolution))

    def timed(self) -> dict:
        self.log.append(("timed", self.resolution))
        value = self.seconds[self.calls % len(self.seconds)]
        self.calls += 1
        return {"seconds": value, "components": {"other": value}}


def test_round_robin_interleaves_and_re_measures_only_noisy_points():
    log: list = []
    quiet, noisy = Clocked(256, [1.0], log), Clocked(512, [1.0, 2.0], log)  # 512 px alternates: IQR / median 0.67
    protocol = TimingProtocol(warmup=1, repeats=3, max_relative_iqr=0.1, max_extra_rounds=2)
    samples, rounds = round_robin([quiet, noisy], protocol)
    assert log == [("warm", 256), ("warm", 512),
                   *[("timed", 256), ("timed", 512)] * 3,  # every round steps every resolution once, in turn
                   ("timed", 512), ("timed", 512)]  # the extra rounds: the noisy point only, at most 2
    assert rounds == [{"kind": "warmup", "sides": [256, 512]}, *[{"kind": "timed", "sides": [256, 512]}] * 3,
                      {"kind": "extra", "sides": [512]}, {"kind": "extra", "sides": [512]}]
    assert len(samples[256]) == 3 and len(samples[512]) == 5
    counted = {"state": {"other": 0}, "activation": {"other": 0}}
    record = point_record({"resolution": 512}, counted, [0], samples[512], "rss", protocol.max_relative_iqr)
    # 1, 2, 1, 2, 1: median 1, quartiles 1 and 2 -> still noisy after the extra rounds: flagged
    assert record["noisy"] and record["seconds"] == 1.0 and (record["seconds_q1"], record["seconds_q3"]) == (1.0, 2.0)
    assert not point_record({"resolution": 256}, counted, [0], samples[256], "rss", 0.1)["noisy"]


def test_a_real_study_records_the_interleaved_order_and_its_threads(tmp_path):
    from tiled_hydra.scaling.study import run_study, save_study

    sides = [32, 64, 96, 128, 160]
    cfg = compose_named("scaling", ["model=padim", f"resolutions=[{','.join(map(str, sides))}]", "n_train=4", "isolation=none",
                                    "timing.cpu.warmup=1", "timing.cpu.repeats=3", "timing.max_extra_rounds=1",
                                    "memory_steps=1", "trainer.accelerator=cpu"])
    run_dir = tmp_path / "study"
    save_study(run_dir, run_study(cfg, run_dir))
    study = json.loads((run_dir / "scaling.json").read_text())
    rounds = study["timing_rounds"]
    assert [r["kind"] for r in rounds[:4]] == ["warmup", "timed", "timed", "timed"]
    assert all(r["sides"] == sides for r in rounds[:4])  # every slot stepped in each round, smallest first
    assert all(r["kind"] == "extra" and set(r["sides"]) <= set(sides) for r in rounds[4:]) and len(rounds) <= 5
    for record in study["measurements"]:
        stepped = sum(record["resolution"] in r["sides"] for r in rounds if r["kind"] != "warmup")
        assert record["timed_steps"] == stepped == len(record["seconds_samples"])
        assert record["seconds_q1"] <= record["seconds"] <= record["seconds_q3"]
    assert study["settings"]["threads"]["torch"] == 1 and study["settings"]["fit"] == {"min_r2": 0.98, "max_holdout_error": 0.15}
    counted = total_fit(study, "counted_bytes")
    assert counted["verdict"] == "good" and counted["holdout"]["relative_error"] < 0.02  # Eq. 1-3 stays quadratic under nnls


def test_a_resolution_measured_in_its_own_process(tmp_path):
    from tiled_hydra.scaling.isolation import RemoteBench

    cfg = compose_named("scaling", ["model=padim", "n_train=4", "trainer.accelerator=cpu"])
    bench = RemoteBench(cfg, 64, torch.device("cpu"), tmp_path / "checkpoints", threads=1)
    try:
        counted = bench.count()
        assert counted["state"]["whitening"] > 0 and counted["activation"]["backbone"] > 0
        bench.warm()
        assert bench.peak() >= sum(counted["state"].values())  # the whole step holds at least the resident state
        step = bench.timed()
        assert step["seconds"] > 0 and set(step["components"]) == {"backbone", "whitening", "other"}
        assert bench.describe()["resolution"] == 64 and bench.describe()["peak_method"] in ("hwm", "sampled")
    finally:
        bench.close()
    assert not bench._process.is_alive()
    assert math.isfinite(step["seconds"])
