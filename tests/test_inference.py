"""The inference engine: one code path for the run's evaluation, the speed protocol and predict.

Every model x setup: the run's evaluation (slots read from their checkpoints, validation and test
in one call) and the engine's batch call (slots kept in memory, one step on the test images)
give the same maps and scores. The faster modes compute the same predictions in another order.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.test_run import TINY, tiny_overrides, write_mvtec
from tiled_hydra.models.backbone import build_backbone
from tiled_hydra.data.base import AnomalyData
from tiled_hydra.slots.trainer import SlotRunner
from tiled_hydra.errors import ConfigError, instantiate_checked
from tiled_hydra.inference.engine import InferenceSettings, cut_tile_features, engine_for, whole_image_features
from tiled_hydra.pipeline import evaluate, make_grid, run

MODELS = ["padim", "padim_ipca", "patchcore", "fastflow", "reverse_distillation"]
QUICK = {  # tiny budgets: the equality does not depend on how well a model learned
    "padim": ["model.net.n_features=20"],
    "padim_ipca": ["model.net.k=2", "model.net.step=2"],
    "patchcore": [],
    "fastflow": ["model.max_steps=2", "model.net.flow_steps=2"],
    "reverse_distillation": ["model.max_steps=2", "model.net.blocks=1"],
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    return write_mvtec(tmp_path_factory.mktemp("mvtec"), n_train=3, n_good=2, n_bad=2)


def overrides(setup: str, model: str, root, *extra: str) -> list[str]:
    return tiny_overrides(setup, root) + [f"model={model}", "model.batch_size=8", *QUICK[model], *extra]


def trained_runner(cfg, run_dir):
    grid = make_grid(cfg.setup)
    data: AnomalyData = instantiate_checked(cfg.dataset, image_size=list(grid.image_size))
    backbone = build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True), layers=list(cfg.model.net.layers))
    kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "accelerator": "cpu"}
    runner = SlotRunner(cfg, grid, backbone, torch.device("cpu"), run_dir / "checkpoints", kwargs)
    runner.train_all(data.train.images)
    return runner, data


@pytest.mark.slow  # 30 tiny trainings: ~2 min on one idle core
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("setup", list(TINY))
def test_run_evaluation_equals_the_engines_batch_call(compose_cfg, mvtec_root, tmp_path, setup, model):
    cfg = compose_cfg(overrides(setup, model, mvtec_root))
    runner, data = trained_runner(cfg, tmp_path)
    # The run's evaluation: slots read from disk, a second split in the same call (as val + test).
    (_, _), (maps, scores) = evaluate(runner, cfg, [data.train, data.test])[0]
    step = engine_for(runner, cfg, keep=True)
    step_maps, step_scores = step(data.test.images)
    assert maps.shape == (len(data.test), *make_grid(cfg.setup).image_size)
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(step_maps, maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(step_scores, scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("setup, model", [("ens9", "padim"), ("st9", "patchcore"), ("ens4", "fastflow"), ("ens9", "reverse_distillation")])
def test_resident_mode_predicts_what_sequential_mode_predicts(compose_cfg, mvtec_root, tmp_path, setup, model):
    cfg = compose_cfg(overrides(setup, model, mvtec_root))
    runner, data = trained_runner(cfg, tmp_path)
    maps, scores = engine_for(runner, cfg, keep=True)(data.test.images)
    resident = engine_for(runner, cfg, keep=True, mode="resident")
    r_maps, r_scores = resident(data.test.images)
    # Same tiles, same weights; only the backbone's batch differs (all slots' tiles at once), which
    # changes float32 rounding in its convolutions, not the result beyond that.
    torch.testing.assert_close(r_maps, maps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r_scores, scores, atol=1e-4, rtol=1e-4)
    # resident on one batch equals resident over the run's two-split call
    (_, _), (maps2, scores2) = resident.predict(data.train.images, data.test.images)
    torch.testing.assert_close(maps2, r_maps, atol=1e-4, rtol=1e-4)


def test_cut_tile_features_are_the_whole_images_features_at_the_tile_window(compose_cfg, mvtec_root):
    cfg = compose_cfg(overrides("ens9", "padim", mvtec_root))
    grid = make_grid(cfg.setup)  # 64 px image, 32 px tiles, stride 16
    backbone = build_backbone(**OmegaConf.to_container(cfg.backbone, resolve=True), layers=[1, 2, 3])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    whole = whole_image_features(backbone, images, grid, torch.device("cpu"))
    cut = cut_tile_features(whole, grid, [4, 8], backbone.reductions)  # centre tile, bottom-right tile
    # tile 4 is at (row 1, col 1): pixels 16..48 -> stride-4 stage rows 4..12
    assert [tuple(c.shape) for c in cut] == [(4, 24, 8, 8), (4, 40, 4, 4), (4, 112, 2, 2)]
    torch.testing.assert_close(cut[0][0], whole[0][0, :, 4:12, 4:12], atol=0, rtol=0)
    torch.testing.assert_close(cut[2][3], whole[2][1, :, 2:4, 2:4], atol=0, rtol=0)


def test_whole_image_on_a_single_tile_is_per_tile(compose_cfg, mvtec_root, tmp_path):
    # With a 1x1 grid the whole image is the tile: both feature choices must agree to float rounding.
    cfg = compose_cfg(overrides("sm256", "padim", mvtec_root))
    runner, data = trained_runner(cfg, tmp_path)
    maps, scores = engine_for(runner, cfg, keep=True)(data.test.images)
    cfg.inference.features = "whole_image"
    for mode in ("sequential", "resident"):
        w_maps, w_scores = engine_for(runner, cfg, keep=True, mode=mode)(data.test.images)
        torch.testing.assert_close(w_maps, maps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_scores, scores, atol=1e-5, rtol=1e-5)


def test_whole_image_trains_and_predicts_with_the_same_features(compose_cfg, mvtec_root, tmp_path):
    cfg = compose_cfg(overrides("ens9", "padim", mvtec_root, "inference.features=whole_image", "speed.enabled=false"))
    results = run(cfg, tmp_path / "whole")
    assert results["inference_features"] == "whole_image" and 0 <= results["pixel_AUPRO"] <= 1
    per_tile = compose_cfg(overrides("ens9", "padim", mvtec_root))
    from tiled_hydra.rundir import slot_fingerprint

    assert slot_fingerprint(cfg) != slot_fingerprint(per_tile)  # a per_tile slot is never resumed as whole_image


def test_bad_inference_settings_are_one_line_config_errors(compose_cfg, mvtec_root, tmp_path):
    with pytest.raises(ConfigError, match="inference.mode"):
        InferenceSettings("fast", "per_tile", 8)
    with pytest.raises(ConfigError, match="inference.features"):
        InferenceSettings("sequential", "tiles", 8)
    # stride 24 is not a multiple of the backbone's reduction 16
    cfg = compose_cfg(overrides("ens9", "padim", mvtec_root, "setup.stride=24", "inference.features=whole_image"))
    with pytest.raises(ConfigError, match="setup.stride.*multiple.*16"):
        run(cfg, tmp_path)
    cfg = compose_cfg(overrides("ens4", "padim_ipca", mvtec_root, "inference.features=whole_image"))
    with pytest.raises(ConfigError, match="whole_image"):
        run(cfg, tmp_path / "ipca")
