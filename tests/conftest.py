"""Shared fixtures: Hydra compose API on the project's conf/, offline W&B, small CPU budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides) -> DictConfig, composed exactly as the command line would."""

    def _compose(overrides: list[str], return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides, return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


def single_torch_thread():
    """Module fixture body: many tiny ops on two cores shared with other jobs run far faster on one
    OpenMP thread (two stall each other at every barrier)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
