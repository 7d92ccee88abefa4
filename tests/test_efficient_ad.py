"""EfficientAD: sizes for any tile, the loss maths by hand, detection, checkpoints, teacher files and cache.

Tiles are 64 px (the PDN's smallest input); the teacher is distilled for a few steps into a
temporary cache, so nothing here reads or writes the user's cache.
"""

from __future__ import annotations

import io
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import ACCURACY, MODELS_PER_SETUP, SETUPS, auroc, efficientnet, tile_sets
from tiled_hydra.errors import ConfigError, instantiate_checked
from tiled_hydra.models.efficient_ad import teacher as teacher_module
from tiled_hydra.models.efficient_ad.teacher import DistillRecipe, distilled_teacher, load_teacher_file
from tiled_hydra.models.efficient_ad.torch_model import (
    AutoEncoder,
    EfficientAdModel,
    decoder_sizes,
    encoder_sizes,
    hard_feature_loss,
    latent_kernel,
    normalize_map,
    pdn,
    pdn_output_size,
    penalty_loss,
    quantile,
)

MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model" / "efficient_ad.yaml"
TILE = 64
TINY_DISTILL = {"steps": 3, "batch_size": 2, "crop_size": 64, "stats_batches": 1}


def n_params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# -- sizes -----------------------------------------------------------------------------------------
def test_reference_sizes_at_256_px():
    # EfficientAD's reference implementation: a 256 px input gives a 56x56 PDN map; its hard-coded decoder sizes
    # are 3, 8, 15, 32, 63, 127; the 8x8 latent convolution leaves a 1x1 latent.
    assert pdn_output_size(256) == 56
    assert decoder_sizes(256) == [3, 8, 15, 32, 63, 127]
    assert encoder_sizes(256) == [128, 64, 32, 16, 8] and latent_kernel(256) == 8
    # Above 256 px the 8x8 convolution stays (a larger latent, as anomalib); below it shrinks to
    # the encoder output so that 64 px still has a 1x1 latent.
    assert latent_kernel(512) == 8 and encoder_sizes(512)[-1] - 8 + 1 == 9
    assert encoder_sizes(64)[-1] == 2 and latent_kernel(64) == 2
    assert decoder_sizes(64) == [1, 2, 3, 8, 15, 31]  # 64/64 - 1 = 0 would be an empty map: at least 1


def test_parameter_counts_match_the_reference():
    # REFERENCE.md: teacher-S ~2.7 M, student-S ~4.3 M, teacher-M ~8.0 M, student-M ~11.6 M, AE ~1.1 M.
    assert n_params(pdn("small", 384)) == pytest.approx(2.7, abs=0.05)
    assert n_params(pdn("small", 768)) == pytest.approx(4.3, abs=0.05)
    assert n_params(pdn("medium", 384)) == pytest.approx(8.0, abs=0.05)
    assert n_params(pdn("medium", 768)) == pytest.approx(11.6, abs=0.05)
    assert n_params(AutoEncoder((256, 256))) == pytest.approx(1.1, abs=0.05)


# (384, 320): above 256 px, where the latent grows instead of the kernel shrinking (less than half of 512 x 512's work)
@pytest.mark.parametrize("tile", [(64, 64), (100, 100), (256, 256), (384, 320), (64, 96), (200, 72)])
def test_maps_have_the_tile_shape_for_any_tile(tile):
    torch.manual_seed(0)
    model = EfficientAdModel("small", tile).eval()
    tiles = torch.rand(2 if max(tile) <= 256 else 1, 3, *tile)
    with torch.no_grad():
        map_st, map_ae = model.raw_maps(model.prepare(tiles))
        anomaly_map, score = model(tiles)
    expected = (pdn_output_size(tile[0]), pdn_output_size(tile[1]))
    assert map_st.shape[-2:] == expected and map_ae.shape[-2:] == expected
    assert anomaly_map.shape == (len(tiles), *tile) and score.shape == (len(tiles),)
    assert torch.isfinite(anomaly_map).all()
    assert torch.equal(score, anomaly_map.flatten(1).amax(dim=1))


def test_medium_pdn_has_the_same_output_grid():
    with torch.no_grad():
        assert pdn("medium", 384)(torch.rand(1, 3, 96, 80)).shape == (1, 384, pdn_output_size(96), pdn_output_size(80))


def test_tiles_below_64_px_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="at least 64 px") as err:
        EfficientAdModel("small", (32, 64))
    assert "\n" not in str(err.value)


def test_a_crop_at_a_stride_multiple_is_exactly_a_window_of_the_whole_output():
    # Why training on crops is exact: the unpadded PDN output of a crop at offset (4a, 4b) is the
    # window [a:, b:] of the whole tile's output.
    torch.manual_seed(0)
    net = pdn("small", 384).eval()
    tile = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        whole = net(tile)
        crop = net(tile[:, :, 12 : 12 + 64, 32 : 32 + 64])
    assert torch.allclose(crop, whole[:, :, 3 : 3 + 8, 8 : 8 + 8], atol=1e-5)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_student_half_is_the_slice_of_the_full_student_gradients_included(size):
    # Training computes only the half of the student's last convolution each loss uses; the
    # values and the gradients must be those of slicing the full output.
    torch.manual_seed(0)
    model = EfficientAdModel(size, (64, 64))
    x = torch.rand(2, 3, 64, 64)
    for half in (0, 1):
        full = model.student(x)[:, half * 384 : (half + 1) * 384]
        grads_full = torch.autograd.grad(full.pow(2).mean(), list(model.student.parameters()))
        part = model.student_half(x, half)
        grads_part = torch.autograd.grad(part.pow(2).mean(), list(model.student.parameters()))
        assert part.shape == full.shape and torch.allclose(part, full, atol=1e-5)
        for a, b in zip(grads_full, grads_part):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_bf16_convolutions_give_the_float32_maps_up_to_bf16_rounding():
    # bfloat16 keeps 8 significant bits (relative rounding <= 2^-9 per value); through four
    # convolutions and a difference of two networks the maps may drift by a few per mille to a
    # percent, never by their scale (measured: 0.05 %). The outputs stay float32 for the maps and losses.
    torch.manual_seed(0)
    model = EfficientAdModel("small", (64, 96)).eval()
    x = model.prepare(torch.rand(2, 3, 64, 96))
    with torch.no_grad():
        reference = model.raw_maps(x)
        model.precision = "bf16"
        low = model.raw_maps(x)
        assert model.teacher_features(x).dtype == torch.float32 and model.reconstruct(x).dtype == torch.float32
    for a, b in zip(reference, low):
        assert b.dtype == torch.float32 and b.shape == a.shape
        assert not torch.equal(a, b)  # bf16 was really used
        assert ((a - b).norm() / a.norm()).item() < 0.01
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item() > 0.99


def test_an_unknown_precision_is_one_line():
    with pytest.raises(ConfigError, match="precision must be one of 32, bf16") as err:
        EfficientAdModel("small", (64, 64), precision="fp16")
    assert "\n" not in str(err.value)


# -- the loss maths by hand --------------------------------------------------------------------------
def test_hard_feature_loss_by_hand():
    # Squared differences 0, 1, 4, ..., 81. The 0.8 quantile (linear) sits at position 0.8 * 9 = 7.2:
    # 49 + 0.2 * (64 - 49) = 52, so only 64 and 81 count: (64 + 81) / 2 = 72.5.
    student = torch.arange(10.0).view(1, 10, 1, 1)
    assert hard_feature_loss(torch.zeros_like(student), student, 0.8).item() == pytest.approx(72.5)
    # q = 0 keeps every element: the plain mean 285 / 10.
    assert hard_feature_loss(torch.zeros_like(student), student, 0.0).item() == pytest.approx(28.5)


def test_penalty_loss_by_hand():
    assert penalty_loss(torch.tensor([[1.0, -2.0], [3.0, 4.0]])).item() == pytest.approx((1 + 4 + 9 + 16) / 4)


def test_map_normalisation_sends_q_a_to_0_and_q_b_to_0_1():
    out = normalize_map(torch.tensor([2.0, 6.0, 10.0]), torch.tensor(2.0), torch.tensor(6.0))
    assert torch.allclose(out, torch.tensor([0.0, 0.1, 0.2]))


def test_quantile_matches_torch_and_passes_its_size_limit():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        assert quantile(values, q).item() == pytest.approx(torch.quantile(values, q).item(), rel=1e-6)  # float rounding of the interpolation
    # 2^24 + 1 elements (the torch releases the reference ran on refuse them in torch.quantile): 0..n-1 permuted, so
    # the q-quantile is q (n - 1).
    n = 2**24 + 1
    big = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()
    assert quantile(big, 0.9).item() == pytest.approx(0.9 * (n - 1), rel=1e-7)


# -- driving a slot as the ensemble does ---------------------------------------------------------------
def slot_config(**net):
    cfg = OmegaConf.load(MODEL_CONF)
    cfg.net.tile_size = TILE
    cfg.net.distill = {**cfg.net.distill, **TINY_DISTILL}
    for key, value in net.items():
        cfg.net[key] = value
    return cfg


def new_slot(cfg, backbone, seed: int = 0):
    L.seed_everything(seed, verbose=False)
    return instantiate(cfg.net, backbone=backbone)


def train(model, tiles: torch.Tensor, steps: int, batch_size: int = 4):
    dataset = model.split_training_data(TensorDataset(tiles))
    trainer = L.Trainer(max_epochs=1000, max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(dataset, batch_size=batch_size, shuffle=True))
    return model.eval()


@pytest.fixture(scope="module")
def cache_dir(data_roots) -> Path:
    """The session's teacher cache: the end-to-end runs distil the same teacher (same backbone and recipe)."""
    return data_roots["teachers"]


@pytest.fixture(scope="module")
def backbone():
    return efficientnet([2, 3])


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return tile_sets(18, TILE)


@pytest.fixture(scope="module")
def trained(data, backbone, cache_dir):
    cfg = slot_config(teacher_cache=str(cache_dir), lr=0.001)  # 10x the default: the test budget is 30 steps
    return cfg, train(new_slot(cfg, backbone), data["train"], steps=30)


def test_components_are_named_children_of_the_pure_model(trained):
    _, model = trained
    children = dict(model.model.named_children())
    assert {"teacher", "student", "autoencoder"} <= set(children)
    assert model.backbone is not None and "backbone" not in children
    assert not any(p.requires_grad for p in model.model.teacher.parameters())


def test_defective_tiles_score_above_normal_ones(trained, data):
    # The bar of tests/test_models.py: AUROC >= 0.8 on 12 normal + 12 defective tiles; with scores
    # independent of the label P(AUROC >= 0.8) = 0.005 (exact Mann-Whitney null distribution).
    _, model = trained
    _, normal = model.predict_tiles(data["normal"])
    maps, defective = model.predict_tiles(data["defective"])
    assert maps.shape == (12, TILE, TILE) and torch.isfinite(maps).all()
    assert auroc(normal, defective) >= 0.8


def test_quantiles_come_from_held_out_tiles_never_trained_on(trained, data, backbone):
    cfg, model = trained
    q_st_a, q_st_b, q_ae_a, q_ae_b = model.model.quantiles.tolist()
    assert q_st_a < q_st_b and q_ae_a < q_ae_b
    # 10% of 18 tiles rounds to 2 = min_holdout: 2 held out, 16 trained on.
    probe = new_slot(cfg, backbone)
    kept = probe.split_training_data(TensorDataset(data["train"]))
    assert len(kept) == 16 and len(probe._holdout) == 2
    assert not set(kept.indices) & set(probe._holdout.indices)


def test_slot_checkpoint_round_trip_is_exact(trained, data, backbone):
    cfg, model = trained
    buffer = io.BytesIO()
    torch.save(model.slot_state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    assert not any(k.startswith("backbone.") for k in state)
    assert any(k.startswith("model.teacher.") for k in state)  # the teacher travels with the slot
    restored = new_slot(cfg, backbone, seed=123)
    restored.load_slot_state_dict(state)
    restored.eval()
    tiles = torch.cat([data["normal"][:3], data["defective"][:3]])
    maps, scores = model.predict_tiles(tiles)
    maps_again, scores_again = restored.predict_tiles(tiles)
    assert torch.equal(maps, maps_again) and torch.equal(scores, scores_again)


def test_the_log_carries_every_loss_term(trained):
    _, model = trained
    metrics = model.trainer.callback_metrics
    for key in ("loss_st", "loss_ae", "loss_stae", "loss_penalty", "train_loss"):
        assert torch.isfinite(metrics[key]), key


def test_autoencoder_loss_on_the_whole_tile_equals_the_crop_windows_when_the_crop_is_the_tile(data, backbone, cache_dir):
    # With the crop capped at the tile size (128 px asked, 64 px tiles) the one crop window is the
    # whole output, so ae_loss_area=tile (teacher on the whole tile) and crops (teacher on the crop)
    # must compute the same term on the same random draws.
    # Distil (or load) the cached teacher first: a distillation inside the first run would draw from
    # the global random state and the two runs would not see the same draws.
    recipe = slot_config().net.distill
    distilled_teacher(backbone, "small", DistillRecipe(**{k: (float(v) if k in ("lr", "weight_decay") else int(v)) for k, v in recipe.items()}),
                      None, str(cache_dir))
    losses = {}
    for area in ("tile", "crops"):
        cfg = slot_config(teacher_cache=str(cache_dir), ae_loss_area=area, crop_size=128)
        model = train(new_slot(cfg, backbone), data["train"][:6], steps=1)
        losses[area] = model.trainer.callback_metrics["loss_ae"].item()
    assert losses["tile"] == pytest.approx(losses["crops"], rel=1e-5)
    with pytest.raises(ConfigError, match="ae_loss_area") as err:
        instantiate_checked(slot_config(teacher_cache=str(cache_dir), ae_loss_area="whole").net, backbone=backbone)
    assert "\n" not in str(err.value)


# -- teacher: cache and files ---------------------------------------------------------------------------
def test_distilled_teacher_is_cached_and_reused(backbone, tmp_path, monkeypatch):
    recipe = DistillRecipe(steps=2, batch_size=2, crop_size=64, lr=1e-3, weight_decay=1e-5, stats_batches=1, seed=0)
    first = distilled_teacher(backbone, "small", recipe, None, str(tmp_path))
    assert len(list(tmp_path.glob("efficientnet_lite0_small_*.pt"))) == 1 and not list(tmp_path.glob("*.tmp*"))

    def no_distillation(*args, **kwargs):
        raise AssertionError("the cached teacher should have been reused")

    # Distilling leaves the global RNG alone, so a slot trains the same with a cold or a warm cache.
    torch.manual_seed(5)
    before = torch.get_rng_state()
    distilled_teacher(backbone, "small", DistillRecipe(**{**recipe.__dict__, "steps": 1}), None, str(tmp_path))
    assert torch.equal(torch.get_rng_state(), before)

    monkeypatch.setattr(teacher_module, "distill_teacher", no_distillation)
    again = distilled_teacher(backbone, "small", recipe, None, str(tmp_path))
    assert all(torch.equal(first[k], again[k]) for k in first)
    # Another recipe is another teacher: distilling it is attempted, not served from the cache.
    with pytest.raises(AssertionError, match="reused"):
        distilled_teacher(backbone, "small", DistillRecipe(**{**recipe.__dict__, "steps": 3}), None, str(tmp_path))


def test_a_teacher_file_is_loaded_into_the_slot(data, backbone, tmp_path):
    torch.manual_seed(7)
    state = pdn("small", 384).state_dict()  # the layout of the public teacher_small.pth
    path = tmp_path / "teacher_small.pth"
    torch.save(state, path)
    model = train(new_slot(slot_config(teacher=str(path), penalty=False), backbone), data["train"][:6], steps=1)
    assert all(torch.equal(model.model.teacher.state_dict()[k], state[k]) for k in state)


def test_a_corrupt_or_wrong_teacher_file_is_a_one_line_error(tmp_path):
    corrupt = tmp_path / "teacher.pth"
    corrupt.write_bytes(b"\x80\x02 not a torch file")
    with pytest.raises(ConfigError, match="model.teacher") as err:
        load_teacher_file(str(corrupt), "small")
    assert "\n" not in str(err.value)
    medium = tmp_path / "medium.pth"
    torch.save(pdn("medium", 384).state_dict(), medium)
    with pytest.raises(ConfigError, match="not a PDN-small state dict"):
        load_teacher_file(str(medium), "small")
    with pytest.raises(ConfigError, match="not found"):
        load_teacher_file(str(tmp_path / "missing.pth"), "small")


def test_a_folder_corpus_gives_crops_and_an_empty_one_is_a_one_line_error(tmp_path):
    from PIL import Image

    from tiled_hydra.models.efficient_ad.corpus import ImageCorpus

    (tmp_path / "n01440764").mkdir()
    Image.new("RGB", (90, 70), (200, 10, 10)).save(tmp_path / "n01440764" / "a.JPEG")
    Image.new("L", (50, 80), 128).save(tmp_path / "b.png")  # grey images become three channels
    crops = ImageCorpus(str(tmp_path)).sample(6, 64, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 64, 64) and 0 <= crops.min() and crops.max() <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images") as err:
        ImageCorpus(str(tmp_path / "empty"))
    assert "\n" not in str(err.value)


# -- end to end (the paper's setups scaled down 4x: 64 px tiles, the PDN's smallest input) -----------------
@pytest.mark.parametrize("setup", SETUPS)
def test_every_setup_runs_end_to_end(trained_run, setup):
    run = trained_run("efficient_ad", setup)
    results = run.results
    assert results["model"] == "efficient_ad"
    assert results["num_models"] == MODELS_PER_SETUP[setup]
    assert len(list((run.run_dir / "checkpoints").glob("slot_*.pt"))) == results["num_models"]
    for key in ACCURACY:
        assert 0.0 <= results[key] <= 1.0, key
    assert results["train_peak_mem_bytes"] > 0 and results["infer_peak_mem_bytes"] > 0


def test_resuming_retrains_only_the_missing_slot_to_the_same_result(trained_run, tmp_path):
    from tiled_hydra.pipeline import train

    cached = trained_run("efficient_ad", "ens4")
    run_dir = cached.copy(tmp_path / "run")
    (run_dir / "results.json").unlink()
    (run_dir / "checkpoints" / "slot_002.pt").unlink()  # as if interrupted while training slot 2
    resumed = train(cached.cfg, run_dir).results
    assert resumed["resumed_slots"] == 3
    for key in ACCURACY:
        assert resumed[key] == pytest.approx(cached.results[key], abs=1e-6), key
