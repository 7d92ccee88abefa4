"""End-to-end runs on tiny data: every setup, resume after interruption, bad inputs end the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiled_hydra.slots.trainer import SlotRunner
from tiled_hydra.pipeline import run
from tiled_hydra.analysis.wandb_reader import read_offline_run

REPO = Path(__file__).resolve().parent.parent
RESULT_KEYS = {
    "image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1", "train_peak_mem_bytes",
    "infer_peak_mem_bytes", "mem_kind", "train_seconds", "infer_seconds", "infer_images_per_second",
    "num_tiles", "num_models", "latency_ms", "throughput_images_per_second", "setup", "model", "backbone", "dataset", "category", "seed",
    "resumed_slots", "checkpoint_bytes", "fingerprint", "merge_score",
}
# The paper's setups scaled down 8x (256 -> 32 px) so that a run takes seconds.
TINY = {
    "sm256": (32, 32, 32), "sm512": (64, 64, 64), "st4": (64, 32, 32),
    "st9": (64, 32, 16), "ens4": (64, 32, 32), "ens9": (64, 32, 16),
}


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.normal(128, 12, (size // 4, size // 4))
    return np.kron(base, np.ones((4, 4)))[:size, :size]


def write_mvtec(root: Path, category: str = "widget", size: int = 64, n_train: int = 6, n_good: int = 3, n_bad: int = 3) -> Path:
    """A tiny tree in the exact MVTec AD layout: bright square defects with pixel masks."""
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


def tiny_overrides(setup: str, root: Path) -> list[str]:
    image, tile, stride = TINY[setup]
    return [
        f"+setup={setup}", f"setup.image_size={image}", f"setup.tile_size={tile}", f"setup.stride={stride}",
        "dataset=mvtec", f"dataset.root={root}", "dataset.category=widget", "logger=none", "model.batch_size=8",
        "report.overlays=2", "speed.warmup=1", "speed.repeats=2", "speed.batch_size=2",
    ]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return write_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.mark.parametrize("setup", list(TINY))
def test_every_setup_runs_end_to_end(compose_cfg, mvtec_root, tmp_path, setup):
    cfg = compose_cfg(tiny_overrides(setup, mvtec_root))
    results = run(cfg, tmp_path)
    assert RESULT_KEYS <= set(results) and results["merge_score"] == "mean"
    for key in ("image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1"):
        assert 0.0 <= results[key] <= 1.0, key
    expected_models = {"sm256": 1, "sm512": 1, "st4": 1, "st9": 1, "ens4": 4, "ens9": 9}[setup]
    assert results["num_models"] == expected_models
    assert len(list((tmp_path / "checkpoints").glob("slot_*.pt"))) == expected_models
    assert list((tmp_path / "overlays").glob("*.png"))


def test_resume_after_interruption_skips_trained_slots(compose_cfg, mvtec_root, tmp_path, monkeypatch):
    cfg = compose_cfg(tiny_overrides("ens4", mvtec_root))
    reference = run(cfg, tmp_path / "uninterrupted")

    fit_slot = SlotRunner.fit_slot
    fitted: list[int] = []

    def interrupt_at_slot_2(self, slot, images, **kwargs):
        if slot == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run
        fitted.append(slot)
        return fit_slot(self, slot, images, **kwargs)

    monkeypatch.setattr(SlotRunner, "fit_slot", interrupt_at_slot_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "resumed")
    assert fitted == [0, 1]
    assert not (tmp_path / "resumed" / "results.json").exists()

    fitted.clear()
    monkeypatch.setattr(SlotRunner, "fit_slot", lambda self, slot, images, **kw: fitted.append(slot) or fit_slot(self, slot, images, **kw))
    resumed = run(cfg, tmp_path / "resumed")
    assert fitted == [2, 3]  # slots 0 and 1 came from their checkpoints
    assert resumed["resumed_slots"] == 2
    for key in ("image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key


def test_resume_refuses_checkpoints_of_another_config(compose_cfg, mvtec_root, tmp_path):
    run(compose_cfg(tiny_overrides("sm256", mvtec_root)), tmp_path)
    other = compose_cfg(tiny_overrides("sm256", mvtec_root) + ["model.net.n_features=50"])
    # A different configuration must retrain rather than silently reuse the slot.
    from tiled_hydra.rundir import slot_fingerprint

    payload_fp = __import__("torch").load(tmp_path / "checkpoints" / "slot_000.pt", weights_only=True)["fingerprint"]
    assert payload_fp == slot_fingerprint(compose_cfg(tiny_overrides("sm256", mvtec_root)))
    assert payload_fp != slot_fingerprint(other)


# -- the command line ---------------------------------------------------------------------------
def cli(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "tiled_hydra", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_cli_writes_results_and_wandb_summary(mvtec_root, tmp_path):
    overrides = [o for o in tiny_overrides("ens4", mvtec_root) if not o.startswith("logger")]
    proc = cli(overrides + ["logger=wandb", "logger.mode=offline"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    summary = read_offline_run(runs[0])["summary"]
    assert summary["pixel_AUPRO"] == pytest.approx(results["pixel_AUPRO"])
    assert summary["image_AUROC"] == pytest.approx(results["image_AUROC"])


def corrupt_image(root: Path) -> None:
    (root / "widget/train/good/000.png").write_bytes(b"not a png")


def drop_mask(root: Path) -> None:
    (root / "widget/ground_truth/spot/000_mask.png").unlink()


def wrong_mask_size(root: Path) -> None:
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "widget/ground_truth/spot/000_mask.png")


def empty_train(root: Path) -> None:
    for f in (root / "widget/train/good").iterdir():
        f.unlink()


@pytest.mark.parametrize(
    "breakage, extra, message",
    [
        (None, ["model=nonexistent"], "model/nonexistent"),
        (None, ["dataset=nonexistent"], "dataset/nonexistent"),
        (None, ["backbone=nonexistent"], "backbone/nonexistent"),
        (None, ["dataset.root=/does/not/exist"], "/does/not/exist"),
        (None, ["dataset.category=nope"], "nope"),
        (corrupt_image, [], "000.png"),
        (drop_mask, [], "mask"),
        (wrong_mask_size, [], "size"),
        (empty_train, [], "train"),
    ],
)
def test_bad_input_ends_the_run_with_one_line(tmp_path, breakage, extra, message):
    root = write_mvtec(tmp_path / "data", n_train=3, n_good=1, n_bad=1)
    if breakage:
        breakage(root)
    proc = cli(tiny_overrides("sm256", root) + extra, tmp_path / "run")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_unknown_setup_and_missing_setup(tmp_path):
    proc = cli(["+setup=ens99", "logger=none"], tmp_path / "a")
    assert proc.returncode != 0 and "setup/ens99" in proc.stderr
    proc = cli(["logger=none"], tmp_path / "b")
    assert proc.returncode != 0
    assert "+setup=NAME" in proc.stderr and "ens9" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
