"""Every pair of setup, model and backbone composes; every model x backbone instantiates."""

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import choices
from tiled_hydra.models.backbone import build_backbone
from tiled_hydra.core.tiling import TileGrid

SETUPS = ["sm256", "sm512", "st4", "st9", "ens4", "ens9"]
PAPER_GRID = {"sm256": (1, 1), "sm512": (1, 1), "st4": (4, 1), "st9": (9, 1), "ens4": (4, 4), "ens9": (9, 9)}


def test_all_six_setups_exist():
    assert set(SETUPS) <= set(choices("setup"))


def all_pairs() -> list[tuple[str, str, str]]:
    """Every (setup, model) pair once, with the backbones in turn so that every (setup, backbone) and
    every (model, backbone) pair occurs too: all pairs of choices in 42 compositions instead of 210."""
    models, backbones = choices("model"), choices("backbone")
    return [(setup, model, backbones[(i + j) % len(backbones)])
            for i, setup in enumerate(SETUPS) for j, model in enumerate(models)]


def test_all_pairs_cover_every_pair_of_choices():
    rows = all_pairs()
    for a, b, wanted in ((0, 1, (SETUPS, choices("model"))), (0, 2, (SETUPS, choices("backbone"))),
                         (1, 2, (choices("model"), choices("backbone")))):
        assert {(r[a], r[b]) for r in rows} == {(x, y) for x in wanted[0] for y in wanted[1]}


@pytest.mark.parametrize("setup, model, backbone", all_pairs())
def test_composes(compose_cfg, setup, model, backbone):
    cfg = compose_cfg([f"+setup={setup}", f"model={model}", f"backbone={backbone}"])
    assert cfg.setup.name == setup and cfg.model.name == model and cfg.backbone.name == backbone
    OmegaConf.resolve(cfg)  # every interpolation resolves


@pytest.mark.parametrize("setup", SETUPS)
def test_setups_have_the_papers_tiles_and_models(compose_cfg, setup):
    cfg = compose_cfg([f"+setup={setup}"])
    grid = TileGrid.create(cfg.setup.image_size, cfg.setup.tile_size, cfg.setup.stride)
    tiles, models = PAPER_GRID[setup]
    assert grid.num_tiles == tiles
    assert (1 if cfg.setup.shared else grid.num_tiles) == models


@pytest.mark.parametrize("model", choices("model"))
@pytest.mark.parametrize("backbone", choices("backbone"))
def test_instantiates(compose_cfg, model, backbone):
    # Paper backbones have no offline weights: random weights keep this test offline.
    cfg = compose_cfg([f"model={model}", f"backbone={backbone}", "backbone.weights=none"])
    net = build_backbone(**OmegaConf.to_container(cfg.backbone), layers=list(cfg.model.net.layers))
    module = instantiate(cfg.model.net, backbone=net)
    assert module.backbone is net


def test_overrides_reach_the_setup(compose_cfg):
    cfg = compose_cfg(["+setup=ens9", "setup.image_size=1024"])
    assert TileGrid.create(cfg.setup.image_size, cfg.setup.tile_size, cfg.setup.stride).num_tiles == 49
