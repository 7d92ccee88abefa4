"""Shared fixtures: Hydra composition of the project's conf/, the tiny datasets, a session cache of
tiny trained runs, and in-process calls of the command-line entry points.

Every (model, setup) pair is trained at most once per test session (``trained_run``): the tests
that need a finished run share it, and copy it before they change anything in it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by every subprocess a test starts

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from tests.helpers import CONF_DIR, TINY, TINY64, loggers_restored, write_mvtec  # noqa: E402 (CONF_DIR: also imported from here)

# Tiny tensors on two cores shared with other jobs: one OpenMP thread is faster (two stall each other
# at every barrier) and makes trainable models deterministic, so in-process and subprocess runs agree.
torch.set_num_threads(1)

# Canonical budgets per model: the smallest at which a run still goes through every stage.
# The cached runs, the subprocess runs compared with them and the validation tests all use these.
QUICK = {
    "padim": [],
    "padim_ipca": ["model.net.k=2", "model.net.step=2"],
    "patchcore": [],
    "fastflow": ["model.max_steps=20", "model.net.flow_steps=2"],
    "reverse_distillation": ["model.max_steps=2", "model.net.blocks=1"],
    # one U-Net pass per tile (start = skip), the narrowest U-Net
    "ddad": ["model.max_steps=2", "model.net.da_steps=1", "model.net.start=25", "model.net.skip=25",
             "model.net.sizes.small.width=8", "model.net.layers_per_block=1"],
    "efficient_ad": ["model.batch_size=4", "model.max_steps=2", "model.penalty=false", "model.net.distill.steps=3",
                     "model.net.distill.batch_size=2", "model.net.distill.crop_size=64",
                     "model.net.distill.stats_batches=1"],
}
# What one cached run of a pair adds, so that every stage is exercised somewhere without a second
# training: the one run without a validation split (thresholds cross-fitted on the test images),
# the one with the speed protocol, the one with overlays, the one with whole-image features, the one with calibrated slots.
PAIR_EXTRA = {
    ("padim", "sm256"): ["data=mvtec"],
    ("padim", "st9"): ["speed.enabled=true"],
    ("padim", "sm512"): ["report.overlays=2"],
    ("patchcore", "ens9"): ["inference.features=whole_image"],  # tiles cut from whole-image features, trained so too
    ("padim", "ens4"): ["merge.calibration=slot"],  # the run predict is compared with: slots on one scale
}
SYNTHETIC = ["dataset.n_train=6", "dataset.n_val=4", "dataset.n_test=6"]


# -- Hydra composition --------------------------------------------------------------------------------
def compose_config(overrides: list[str], config_name: str = "config", return_hydra_config: bool = False):
    """The configuration the command line would compose from ``overrides``."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides, config_name="config", return_hydra_config=False) -> DictConfig."""
    return compose_config


# -- tiny datasets --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    """A tiny MVTec AD tree (6 train, 3 good + 3 defective test images of 64 px): never modified."""
    return write_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def data_roots(tmp_path_factory, mvtec_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {"mvtec": mvtec_root, "synthetic64": root / "r64", "synthetic128": root / "r128",
            "teachers": tmp_path_factory.mktemp("teachers")}


class Tiny:
    """tiny(setup, model="padim", *extra) -> the overrides of a tiny run (list of key=value).

    Synthetic data (6 train, 4 validation, 6 test images of 64 px; 128 px for EfficientAD) unless
    ``data=mvtec`` is among ``extra``; no W&B, no overlays, no speed protocol unless asked for.
    """

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots

    def __call__(self, setup: str, model: str = "padim", *extra: str) -> list[str]:
        extra = list(extra)
        data = "mvtec" if "data=mvtec" in extra else "synthetic"
        extra = [e for e in extra if e != "data=mvtec"]
        image, tile, stride = (TINY64 if model == "efficient_ad" else TINY)[setup]
        if data == "mvtec":
            dataset = ["dataset=mvtec", f"dataset.root={self.roots['mvtec']}", "dataset.category=widget"]
        else:
            side = 128 if model == "efficient_ad" else 64
            dataset = ["dataset=synthetic", f"dataset.root={self.roots[f'synthetic{side}']}",
                       f"dataset.resolution={side}", *SYNTHETIC]
        teacher = [f"model.net.teacher_cache={self.roots['teachers']}"] if model == "efficient_ad" else []
        return [f"+setup={setup}", f"setup.image_size={image}", f"setup.tile_size={tile}", f"setup.stride={stride}",
                *dataset, "logger=none", f"model={model}", "model.batch_size=8", *QUICK[model], *teacher,
                "report.overlays=0", "report.maps=npy", "speed.warmup=1", "speed.repeats=2", "speed.batch_size=2",
                *extra]

    def canonical(self, setup: str, model: str = "padim") -> list[str]:
        """The overrides of the cached run of (model, setup)."""
        return self(setup, model, *PAIR_EXTRA.get((model, setup), []))


@pytest.fixture(scope="session")
def tiny(data_roots) -> Tiny:
    return Tiny(data_roots)


# -- the session cache of trained runs -------------------------------------------------------------------
@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path  # shared by every test: read it, or copy() it before changing anything
    results: dict
    overrides: tuple[str, ...]

    @property
    def cfg(self):
        return compose_config(list(self.overrides))

    def copy(self, target: Path) -> Path:
        shutil.copytree(self.run_dir, target, symlinks=True)
        return target


def freeze_garbage_collector() -> None:
    """What the command does before a run (tiled_hydra.cli.train): every object alive now is left out
    of later collections. A run collects garbage after every slot; with the ~1 M objects of the
    imported libraries tracked, each collection took ~0.4 s (most of a tiny ENS9 run)."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session) -> None:
    freeze_garbage_collector()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny):
    """trained_run(model="padim", setup="ens4", *extra) -> TrainedRun, trained once per session.

    Without ``extra`` the pair's canonical configuration (``Tiny.canonical``); with it, the run of
    exactly those overrides (a second training of the pair: use sparingly)."""
    from tiled_hydra.pipeline import train

    cache: dict[tuple, TrainedRun] = {}

    def get(model: str = "padim", setup: str = "ens4", *extra: str) -> TrainedRun:
        key = (model, setup, extra)
        if key not in cache:
            overrides = tiny(setup, model, *extra) if extra else tiny.canonical(setup, model)
            run_dir = tmp_path_factory.mktemp(f"run_{model}_{setup}")
            freeze_garbage_collector()
            outcome = train(compose_config(overrides), run_dir)
            cache[key] = TrainedRun(run_dir, outcome.results, tuple(overrides))
        return cache[key]

    return get


# -- the command-line entry points, in this process ----------------------------------------------------------
@dataclass
class Called:
    code: int
    out: str
    err: str


def invoke(entry, args: list) -> Called:
    """A command's entry function run in this process (``tiled_hydra.cli.train.cli``, ``...predict.main``,
    ...): its exit code and what it wrote to stdout and stderr.

    Hydra configures the root logger for a job (console and RUN_DIR/tiled_hydra.log); the loggers,
    sys.argv and HYDRA_FULL_ERROR are put back as they were afterwards, so a later test's output is
    not sent to a closed stream."""
    argv, full_error = sys.argv[:], os.environ.get("HYDRA_FULL_ERROR")
    out, err = io.StringIO(), io.StringIO()
    freeze_garbage_collector()
    code = 0
    with loggers_restored():
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                returned = entry([str(a) for a in args])
            code = returned if isinstance(returned, int) else 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv[:] = argv
            if full_error is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)
            else:
                os.environ["HYDRA_FULL_ERROR"] = full_error
    return Called(code, out.getvalue(), err.getvalue())


def main_command(args: list, run_dir: Path | None = None) -> Called:
    """``python -m tiled_hydra args hydra.run.dir=run_dir``, in this process."""
    from tiled_hydra.cli.train import cli

    return invoke(cli, [*args, *([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])])


@pytest.fixture
def call():
    """call(entry, args) -> Called(code, out, err): see :func:`invoke`."""
    return invoke


@pytest.fixture
def main_cli():
    """main_cli(args, run_dir=None) -> Called: see :func:`main_command`."""
    return main_command
