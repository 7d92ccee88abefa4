"""The tile planner: budget parsing, the choice rules on curves known exactly, and the command
line on a study file written by hand (the measured path is in test_scaling.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.helpers import assert_one_line
from tiled_hydra.errors import ConfigError
from tiled_hydra.scaling.plan import candidates, choose
from tiled_hydra.scaling.fit import Quadratic
from tiled_hydra.scaling.units import format_bytes, parse_bytes
from tiled_hydra.core.tiling import TileGrid

# memory 1 MB + 100 B/px^2 (about 25 B per pixel of a square side x); time 1 ms + 1 us/px^2
MEMORY = Quadratic(1e6, 0.0, 100.0, 1.0, 6)
SECONDS = Quadratic(1e-3, 0.0, 1e-6, 1.0, 6)


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9),
                                            ("1.5 GiB", 3 * 2**29), ("100B", 100), ("64kib", 64 * 1024)])
def test_budget_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8", "8 XB", "GiB", "-1GiB", "0MiB", ""])
def test_budget_without_a_valid_unit_is_a_one_line_error(text):
    with pytest.raises(ConfigError) as err:
        parse_bytes(text)
    assert "memory_budget" in str(err.value) and "\n" not in str(err.value)


def test_single_model_when_it_fits():
    single = float(MEMORY(512))  # 27.2 MB
    plan = choose(512, int(single * 1.1) + 1, MEMORY, SECONDS)
    assert plan.single and plan.num_tiles == 1 and plan.tile_size == (512, 512)
    assert plan.predicted_bytes == pytest.approx(single)
    assert choose(512, int(single * 1.1) + 1, MEMORY, SECONDS, objective="latency").single  # also the fastest here


def test_largest_feasible_tile_respects_the_budget():
    budget = 20 * 10**6
    plan = choose(512, budget, MEMORY, SECONDS, overlap=True)
    # (1e6 + 100 t^2) * 1.1 <= 2e7  <=>  t <= 414.6: tiles 64, 96, ..., 384 fit, 416 does not
    assert plan.tile_size == (384, 384) and plan.stride == (192, 192)
    assert plan.num_tiles == TileGrid.create(512, 384, 192).num_tiles == 4
    assert plan.predicted_bytes * 1.1 <= budget < MEMORY(416) * 1.1
    assert plan.predicted_seconds == pytest.approx(4 * SECONDS(384))
    no_overlap = choose(512, budget, MEMORY, SECONDS, overlap=False)
    assert no_overlap.stride == (384, 384) and no_overlap.num_tiles == 4  # 2x2 with zero padding


def test_latency_objective_takes_the_fastest_feasible_plan():
    budget = 20 * 10**6
    plan = choose(512, budget, MEMORY, SECONDS, objective="latency")
    feasible = [p for p in candidates((512, 512), MEMORY, SECONDS, True, 64, 32) if p.predicted_bytes * 1.1 <= budget]
    assert plan.predicted_seconds == min(p.predicted_seconds for p in feasible)
    # 352 px tiles with stride 176 still cover 512 px in 2x2 tiles, each cheaper than 384 px
    assert plan.tile_size == (352, 352) and plan.num_tiles == 4


def test_non_square_image_and_infeasible_budget():
    plan = choose([2048, 2448], 8 * 2**30, MEMORY, SECONDS)
    assert plan.single and plan.predicted_bytes == pytest.approx(1e6 + 100 * 2048 * 2448)  # same pixel count
    with pytest.raises(ConfigError) as err:
        choose(512, 10**6, MEMORY, SECONDS)  # even the constant 1 MB does not fit with headroom
    smallest = format_bytes(MEMORY(64) * 1.1)
    assert f"smallest feasible budget is {smallest}" in str(err.value) and "\n" not in str(err.value)


def write_study(root: Path, model: str = "padim", backbone: str = "efficientnet_lite0") -> Path:
    # exact quadratics, each checked by a hold-out point (the planner refuses fits without one)
    fits = [{"quantity": q, "component": "total", "b0": c.b0, "b1": c.b1, "b2": c.b2, "r2": 1.0, "n_points": 6,
             "holdout": {"x": 1024.0, "measured": float(c(1024)), "predicted": float(c(1024)), "relative_error": 0.0},
             "extrapolated": {}} for q, c in (("peak_bytes", MEMORY), ("counted_bytes", MEMORY), ("seconds", SECONDS))]
    study = {"study": "scaling", "model": model, "backbone": backbone, "components": [], "fits": fits,
             "measurements": [{"mem_kind": "rss"}], "max_resolution": [],
             "settings": {"device": "cpu", "resolutions": [256, 384, 512, 640, 768, 1024], "n_train": 8}}
    (root / "job").mkdir(parents=True)
    (root / "job" / "scaling.json").write_text(json.dumps(study))
    return root


def plan_command(args: list[str]) -> None:
    """``python -m tiled_hydra.plan args`` (a Hydra app: it reads sys.argv), in this process."""
    from tiled_hydra.cli.plan import cli

    sys.argv = ["tiled_hydra.plan", *args]
    cli()


def test_command_prints_the_plan_and_the_override_line(call, tmp_path):
    root = write_study(tmp_path)
    ran = call(plan_command, ["model=padim", "image_size=512", "memory_budget=20MB", f"study={root}",
                              f"hydra.run.dir={tmp_path / 'plan'}"])
    assert ran.code == 0, ran.err
    assert "tile 384 px, stride 192 px -> 4 tiles, 4 models" in ran.out
    assert ("run: python -m tiled_hydra +setup=ens9 model=padim backbone=efficientnet_lite0 setup.image_size=512 setup.tile_size=384 "
            "setup.stride=192 model.batch_size=1") in ran.out


def compose_plan(overrides: list[str]):
    return compose_config(overrides, config_name="plan")


@pytest.mark.parametrize("overrides, fragment", [
    (["memory_budget=8GiB", "study=/nonexistent/dir"], "study=/nonexistent/dir: no such directory"),
    (["memory_budget=8GiB", "model=patchcore"], "holds no study of model=patchcore"),
    (["memory_budget=8GiB", "objective=fast"], "objective=fast: choose one of accuracy, latency"),
    (["memory_budget=8GiB", "memory=rss"], "memory=rss: choose one of max, peak_bytes, counted_bytes"),
    (["memory_budget=8GiB", "study=null", "resolutions=[]"], "resolutions must be a non-empty list"),
    (["memory_budget=8GiB", "study=null", "resolutions=[128,-256,512]"], "resolutions must be positive integers"),
])
def test_bad_inputs_are_one_line_config_errors(tmp_path, overrides, fragment):
    from tiled_hydra.scaling.plan import plan_from_cfg

    root = write_study(tmp_path)
    cfg = compose_plan(["model=padim", "image_size=512", f"study={root}", *overrides])
    with pytest.raises(ConfigError) as err:
        plan_from_cfg(cfg, tmp_path / "run")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_command_reports_a_user_error_in_one_line(call, tmp_path):
    root = write_study(tmp_path)
    ran = call(plan_command, ["model=padim", "image_size=512", f"study={root}", "memory_budget=8",
                              f"hydra.run.dir={tmp_path / 'plan'}"])
    line = assert_one_line(ran.code, ran.err, expected_code=2)
    assert line == ("tiled_hydra.plan: error: memory_budget=8: give a number with a unit, e.g. memory_budget=8GiB, "
                    "512MiB or 8GB")
