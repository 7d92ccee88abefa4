"""The inference engine: one code path for the run's evaluation, the speed protocol and predict.

Every model x setup: the maps and scores the run's evaluation wrote (slots read from their
checkpoints, validation and test in one call) equal the engine's batch call on the test images
(slots kept in memory). The faster modes compute the same predictions in another order.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from tests.helpers import SETUPS
from tiled_hydra.build import build_data, build_grid, build_run
from tiled_hydra.core.features import TileFeatures, cut_tile_features, whole_image_features
from tiled_hydra.errors import ConfigError
from tiled_hydra.inference.engine import InferenceSettings
from tiled_hydra.reporting.maps import at_size
from tiled_hydra.reporting.results import TEST_PREDICTIONS_FILE

MODELS = ["padim", "padim_ipca", "patchcore", "fastflow", "reverse_distillation"]


def opened(cached):
    """The cached run wired again over its checkpoints (nothing retrained), and its data."""
    cfg = cached.cfg
    run = build_run(cfg, cached.run_dir / "checkpoints")
    return run, build_data(cfg, run.grid)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_run_evaluation_equals_the_engines_batch_call(trained_run, setup, model):
    cached = trained_run(model, setup)
    run, data = opened(cached)
    maps, scores = run.engine(keep=True)(data.test.images)
    assert maps.shape == (len(data.test), *run.grid.image_size) and torch.isfinite(maps).all()
    with (cached.run_dir / TEST_PREDICTIONS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == list(data.test.paths)
    for i, row in enumerate(rows):
        assert float(row["score"]) == pytest.approx(float(scores[i]), abs=1e-6), row["path"]
        written = np.load(cached.run_dir / row["map"])  # the raw map at the image's own size (report.maps=npy)
        expected = at_size(maps[i], written.shape).numpy()
        np.testing.assert_allclose(written, expected, atol=1e-5, rtol=0, err_msg=row["path"])


@pytest.mark.parametrize("setup, model", [("ens9", "padim"), ("st9", "patchcore"), ("ens4", "fastflow"),
                                          ("ens9", "reverse_distillation"), ("ens9", "patchcore")])
def test_resident_mode_predicts_what_sequential_mode_predicts(trained_run, setup, model):
    run, data = opened(trained_run(model, setup))
    maps, scores = run.engine(keep=True)(data.test.images)
    resident = run.engine(keep=True, mode="resident")
    r_maps, r_scores = resident(data.test.images)
    # Same tiles, same weights; only the backbone's batch differs (all slots' tiles at once), which
    # changes float32 rounding in its convolutions, not the result beyond that.
    torch.testing.assert_close(r_maps, maps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r_scores, scores, atol=1e-4, rtol=1e-4)
    # resident on one batch equals resident over the run's two-split call
    (_, _), (maps2, _) = resident.predict(data.train.images, data.test.images)
    torch.testing.assert_close(maps2, r_maps, atol=1e-4, rtol=1e-4)


def test_cut_tile_features_are_the_whole_images_features_at_the_tile_window(compose_cfg, tiny):
    from tests.helpers import efficientnet

    cfg = compose_cfg(tiny.canonical("ens9"))
    grid = build_grid(cfg.setup)  # 64 px image, 32 px tiles, stride 16
    backbone = efficientnet([1, 2, 3])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    whole = whole_image_features(backbone, images, grid, torch.device("cpu"))
    cut = cut_tile_features(whole, grid, [4, 8], backbone.reductions)  # centre tile, bottom-right tile
    # tile 4 is at (row 1, col 1): pixels 16..48 -> stride-4 stage rows 4..12
    assert [tuple(c.shape) for c in cut] == [(4, 24, 8, 8), (4, 40, 4, 4), (4, 112, 2, 2)]
    torch.testing.assert_close(cut[0][0], whole[0][0, :, 4:12, 4:12], atol=0, rtol=0)
    torch.testing.assert_close(cut[2][3], whole[2][1, :, 2:4, 2:4], atol=0, rtol=0)


def test_whole_image_on_a_single_tile_is_per_tile(trained_run):
    # With a 1x1 grid the whole image is the tile: both feature choices must agree to float rounding.
    run, data = opened(trained_run("padim", "sm256"))
    maps, scores = run.engine(keep=True)(data.test.images)
    run.features = TileFeatures(run.backbone, run.grid, run.device, "whole_image")
    for mode in ("sequential", "resident"):
        w_maps, w_scores = run.engine(keep=True, mode=mode)(data.test.images)
        torch.testing.assert_close(w_maps, maps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w_scores, scores, atol=1e-5, rtol=1e-5)


def test_whole_image_trains_and_predicts_with_the_same_features(trained_run, compose_cfg, tiny):
    from tiled_hydra.rundir import slot_fingerprint

    cached = trained_run("patchcore", "ens9")  # the pair whose cached run uses whole-image features
    assert cached.results["inference_features"] == "whole_image" and 0 <= cached.results["pixel_AUPRO"] <= 1
    per_tile = compose_cfg(tiny("ens9", "patchcore"))
    assert slot_fingerprint(cached.cfg) != slot_fingerprint(per_tile)  # a per_tile slot is never resumed as whole_image
    record = (cached.run_dir / "checkpoints" / "slot_000.json").read_text()
    assert '"inference.features": "whole_image"' in record


def test_bad_inference_settings_are_one_line_config_errors(compose_cfg, tiny, tmp_path):
    from tests.helpers import efficientnet
    from tiled_hydra.pipeline import train

    with pytest.raises(ConfigError, match="inference.mode"):
        InferenceSettings("fast", 8)
    grid = build_grid(compose_cfg(tiny.canonical("ens9")).setup)
    with pytest.raises(ConfigError, match="inference.features"):
        TileFeatures(efficientnet([1, 2, 3]), grid, torch.device("cpu"), "tiles")
    # stride 24 is not a multiple of the backbone's reduction 16
    cfg = compose_cfg(tiny("ens9", "padim", "setup.stride=24", "inference.features=whole_image"))
    with pytest.raises(ConfigError, match="setup.stride.*multiple.*16") as err:
        train(cfg, tmp_path / "stride")
    assert "\n" not in str(err.value)
    cfg = compose_cfg(tiny("ens4", "padim_ipca", "inference.features=whole_image"))
    with pytest.raises(ConfigError, match="whole_image"):
        train(cfg, tmp_path / "ipca")
