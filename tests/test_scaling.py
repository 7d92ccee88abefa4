"""Scaling study (paper 003): counting hooks against hand computations, fits against known
quadratics, a real tiny study through Hydra composition, and compare picking it up."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import compose_config
from tiled_hydra.errors import ConfigError
from tiled_hydra.models.padim.torch_model import row_block_bounds
from tiled_hydra.scaling.counting import ComponentProbe, components, head_name, state_bytes
from tiled_hydra.scaling.fit import Quadratic, holdout_error
from tiled_hydra.scaling.study import check_resolutions

F32 = 4


def compose_named(name: str, overrides: list[str]):
    return compose_config(overrides, config_name=name)


# -- counting (Eq. 1-3) on a net small enough to compute by hand ----------------------------------
class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.refine = nn.Conv2d(4, 2, 1)  # called twice per forward: a layer counts once (Eq. 3 per layer)
        self.register_buffer("memory_bank", torch.zeros(10, 2))
        self.register_buffer("channel_index", torch.arange(5))

    def forward(self, x):
        y = self.refine(x)
        y = self.refine(x) + y
        return y.mean(dim=1), y.flatten(1).amax(dim=1)


class TinySlot(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
        self.model = TinyModel()

    def predict_tiles(self, x):
        return self.model(self.backbone(x))


def test_counted_bytes_match_eq_2_and_3_by_hand():
    slot = TinySlot().eval()
    probe = ComponentProbe(slot)
    assert probe.names == ["backbone", "refine", "memory_bank", "other"]
    with torch.no_grad(), probe.recording():
        slot.predict_tiles(torch.rand(1, 3, 32, 32))
    # Eq. 2 per conv: C_in C_out K^2 + C_out parameters
    assert probe.state_bytes()["backbone"] == (3 * 8 * 9 + 8 + 8 * 4 * 9 + 4) * F32
    assert probe.state_bytes()["refine"] == (4 * 2 * 1 + 2) * F32
    # own buffers of the model: 10x2 float32 bank + 5 int64 indices
    assert probe.state_bytes()["memory_bank"] == 10 * 2 * F32 + 5 * 8
    # Eq. 3 per layer, H_out W_out C_out: conv 32x32x8, ReLU 32x32x8, strided conv 16x16x4
    activation = probe.activation_bytes()
    assert activation["backbone"] == (32 * 32 * 8 + 32 * 32 * 8 + 16 * 16 * 4) * F32
    assert activation["refine"] == 16 * 16 * 2 * F32  # two calls, one layer: counted once
    assert activation["memory_bank"] == (16 * 16 + 1) * F32  # the model's outputs: map (1, 16, 16) and score (1,)


def test_state_bytes_are_numel_times_element_size():
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)).to(torch.float64)
    expected = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    assert state_bytes(net) == expected
    # BatchNorm: weight, bias, running mean/var (float64) + num_batches_tracked (int64)
    assert expected == (3 * 5 * 9 + 5) * 8 + 4 * 5 * 8 + 8


def test_container_children_are_timed_and_named():
    class WithList(nn.Module):
        def __init__(self):
            super().__init__()
            self.flows = nn.ModuleList([nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)])

        def forward(self, x):
            for f in self.flows:
                x = f(x)
            return x

    slot = nn.Module()
    slot.backbone = nn.Identity()
    slot.model = WithList()
    probe = ComponentProbe(slot)
    assert head_name(slot.model) == "head"  # no own state
    slot.model.register_buffer("teacher_mean", torch.zeros(1, 384, 1, 1))  # per-channel constants do not name it
    assert head_name(slot.model) == "head"
    with probe.recording():
        slot.model(slot.backbone(torch.rand(1, 2, 8, 8)))
    assert probe.seconds["flows"] > 0  # ModuleList is never called itself: its members carry the time
    assert probe.activation_bytes()["flows"] == 2 * 2 * 8 * 8 * F32


@pytest.mark.parametrize("model, expected", [
    ("padim", ["backbone", "whitening", "other"]),
    ("patchcore", ["backbone", "memory_bank", "other"]),
    ("fastflow", ["backbone", "flows", "head", "other"]),
    ("reverse_distillation", ["backbone", "bottleneck", "decoder", "head", "other"]),
    ("padim_ipca", ["backbone", "pca", "head", "other"]),
])
def test_components_of_every_model_come_from_names(model, expected):
    from hydra.utils import instantiate

    from tiled_hydra.models.backbone import build_backbone

    cfg = compose_named("scaling", [f"model={model}"])
    backbone = build_backbone(**cfg.backbone, layers=list(cfg.model.net.layers))
    slot = instantiate(cfg.model.net, backbone=backbone)
    if model == "patchcore":
        slot.model.memory_bank = torch.zeros(3, 8)  # fitted state, so the head is named after it
    if model == "padim":
        for i, rows in enumerate((1, 1, 1)):  # the three row blocks of a 3 x 3 whitening
            setattr(slot.model, f"whitening_{i}", torch.zeros(2, i + 1, rows))
    assert ComponentProbe(slot).names == expected
    assert list(components(slot))[0] == "backbone"


# -- fits (Eq. 3-4) ----------------------------------------------------------------------------------
def test_fit_recovers_a_known_quadratic_exactly():
    x = np.array([256, 384, 512, 640, 768, 1024])
    y = 3.0e6 + 1.5e3 * x + 40.0 * x**2
    curve = Quadratic.fit(x, y)
    assert (curve.b0, curve.b1, curve.b2) == pytest.approx((3.0e6, 1.5e3, 40.0), rel=1e-8)
    assert curve.r2 == pytest.approx(1.0, abs=1e-12)
    hold = holdout_error(x, y)
    assert hold["x"] == 1024 and hold["relative_error"] < 1e-9
    assert curve(3000) == pytest.approx(3.0e6 + 1.5e3 * 3000 + 40.0 * 3000**2)
    # largest side under a budget: the curve at 1000 px is exactly the budget
    assert curve.largest_side(float(curve(1000))) == 1000


def test_fit_of_a_constant_and_of_noise():
    assert Quadratic.fit([1, 2, 3, 4], [5, 5, 5, 5]).r2 == 1.0  # parameters do not grow with resolution
    noisy = Quadratic.fit([1, 2, 3, 4, 5], [0, 1, 0, 1, 0])
    assert 0 <= noisy.r2 < 1
    assert holdout_error([1, 2, 3], [1, 4, 9]) is None  # 3 points: nothing left to hold out
    with pytest.raises(ValueError):
        Quadratic.fit([1, 2], [1, 2])


@pytest.mark.parametrize("bad", [[], "256", [256, 0], [256, -512], [256.5], [256, 256]])
def test_bad_resolutions_are_config_errors(bad):
    with pytest.raises(ConfigError) as err:
        check_resolutions(bad)
    assert "\n" not in str(err.value)


# -- a real tiny study --------------------------------------------------------------------------
SIDES = [32, 64, 96, 128]  # multiples of the deepest stride (32): no rounding in the layer grids


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """What ``python -m tiled_hydra.scaling`` does: measure (run_study), draw, save scaling.json last."""
    from tiled_hydra.scaling.figures import study_figures
    from tiled_hydra.scaling.study import run_study, save_study

    cfg = compose_named("scaling", ["model=padim", f"resolutions=[{','.join(map(str, SIDES))}]", "n_train=4",
                                    "timing.cpu.warmup=0", "timing.cpu.repeats=1", "trainer.accelerator=cpu",
                                    "isolation=none"])  # (a resolution in its own process: test_scaling_fits.py)
    run_dir = tmp_path_factory.mktemp("study") / "padim"
    study = run_study(cfg, run_dir)
    assert not (run_dir / "scaling.json").exists() and not list(run_dir.glob("*.png"))  # measuring only
    study["figures"] = [p.name for p in study_figures(study, run_dir)]
    save_study(run_dir, study)
    return study, run_dir


def test_study_writes_everything_and_padim_state_is_its_gaussians(tiny_study):
    study, run_dir = tiny_study
    for name in ("scaling.json", "measurements.csv", "fits.csv", "memory_components.png", "runtime_components.png"):
        assert (run_dir / name).is_file()
    assert not (run_dir / "checkpoints").exists()
    assert study["settings"]["n_train"] == 4 and study["settings"]["batch_size"] == 1
    assert study["settings"]["random_backbone_weights"] is False  # efficientnet_lite0 package weights
    for record in study["measurements"]:
        side = record["resolution"]
        patches = (side // 4) ** 2  # finest stage of efficientnet_lite0: stride 4
        d = 100  # conf/model/padim.yaml n_features
        # mean (P, D) + whitening row blocks (P, b_i+1, b_i+1 - b_i) float32 + channel_index (D,) int64
        bounds = row_block_bounds(d)
        blocks = patches * sum(hi * (hi - lo) for lo, hi in zip(bounds, bounds[1:])) * F32
        assert record["components"]["whitening"]["state_bytes"] == patches * d * F32 + blocks + d * 8
        assert record["peak_bytes"] >= record["state_bytes"]  # the whole step holds at least the resident state
        assert record["seconds"] > 0


def test_counted_memory_is_quadratic_in_the_side(tiny_study):
    study, _ = tiny_study
    fit = next(f for f in study["fits"] if f["quantity"] == "counted_bytes" and f["component"] == "total")
    assert fit["r2"] > 0.9999
    assert fit["holdout"]["x"] == max(SIDES) and fit["holdout"]["relative_error"] <= 0.02  # the bar
    rows = [r for r in study["max_resolution"] if r["quantity"] == "counted_bytes"]
    assert len(rows) == 6 and all(r["single_model_side"] < r["tiled_side"] for r in rows)


def test_study_files_round_trip_and_are_found_again(tiny_study):
    import json

    from tiled_hydra.scaling.study import find_studies

    study, run_dir = tiny_study
    assert json.loads((run_dir / "scaling.json").read_text())["fits"] == study["fits"]
    found = find_studies([str(run_dir.parent)])
    assert [(s["model"], s["source"]) for s in found] == [("padim", str(run_dir))]
    assert study["figures"] == ["memory_components.png", "runtime_components.png"]


def test_compare_draws_cross_model_figures_from_study_dirs(call, tiny_study, tmp_path):
    from tiled_hydra.cli.compare import main

    _, run_dir = tiny_study
    out = tmp_path / "cmp"
    assert call(main, [f"sources={run_dir.parent}", f"out={out}"]).code == 0  # the command's entry point, in-process
    for name in ("memory_extrapolated.png", "runtime_extrapolated.png", "peak_extrapolated.png", "max_resolution.md",
                 "fits.md", "components.md"):
        assert (out / name).is_file()
    assert "| padim |" in (out / "max_resolution.md").read_text()


def test_experiment_paper_and_model_options_apply():
    cfg = compose_named("scaling", ["model=patchcore", "experiment=paper", "model.net.coreset_ratio=0.01"])
    assert cfg.backbone.name == "resnet18" and cfg.model.net.coreset_ratio == 0.01


def test_planned_tile_measured_for_real_stays_within_the_budget(tiny_study):
    """Plan a 256 px image under a budget the single model exceeds, then fit and measure a slot
    at the planned tile size: its measured whole-step peak stays under the budget."""
    from tiled_hydra.models.backbone import build_backbone
    from tiled_hydra.scaling.plan import choose, study_curves
    from tiled_hydra.scaling.measure import measure_resolution

    study, run_dir = tiny_study
    memory, seconds = study_curves(study)  # the default: the larger of measured peak and Eq. 1-3 count
    budget = int(memory(160))  # below the single model at 256 px, above the 64 px tile
    plan = choose(256, budget, memory, seconds)
    assert not plan.single and 64 <= plan.tile_size[0] < 160
    cfg = compose_named("scaling", ["model=padim", "n_train=4", "trainer.accelerator=cpu"])
    backbone = build_backbone(**cfg.backbone, layers=list(cfg.model.net.layers))
    record = measure_resolution(cfg, backbone, plan.tile_size[0], torch.device("cpu"), run_dir / "plan_check", warmup=0,
                                repeats=1)
    assert record["peak_bytes"] <= budget
