"""`python -m tiled_hydra.predict`: a trained run dir scores new images, never modifying the run dir."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.test_run import tiny_overrides, write_mvtec
from tiled_hydra.core.postprocess import load_postprocessor
from tiled_hydra.cli.predict import main
from tiled_hydra.pipeline import TEST_PREDICTIONS_FILE, run

REPO = Path(__file__).resolve().parent.parent


def read_rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    """A finished ENS4 PaDiM run on tiny data with a validation split (thresholds fitted there)."""
    torch.set_num_threads(1)
    root = write_mvtec(tmp_path_factory.mktemp("data"), n_train=4, n_good=2, n_bad=2)
    cat = root / "widget"
    overrides = [o for o in tiny_overrides("ens4", root) if not o.startswith("dataset")] + [
        "dataset=folder", f"dataset.root={cat}", "dataset.normal_dir=train/good", "dataset.normal_test_dir=test/good",
        "dataset.abnormal_dir=test/spot", "dataset.mask_dir=ground_truth/spot", "dataset.val_normal_dir=test/good",
        "dataset.val_abnormal_dir=test/spot", "speed.enabled=false", "model.net.n_features=20",
    ]
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    run_dir = tmp_path_factory.mktemp("run")
    run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes for a command-line run
    return run_dir, cat


def test_predict_on_the_runs_test_images_reproduces_its_scores_and_labels(trained, tmp_path):
    run_dir, cat = trained
    before = snapshot(run_dir)
    assert main([f"run_dir={run_dir}", f"input={cat / 'test'}", f"output={tmp_path}"]) == 0
    assert snapshot(run_dir) == before  # nothing in the run dir is modified
    ours = read_rows(tmp_path / "predictions.csv")
    theirs = read_rows(run_dir / TEST_PREDICTIONS_FILE)
    assert set(ours) == set(theirs) and len(ours) == 4
    post, fitted_on = load_postprocessor(run_dir / "postprocess.json")
    assert fitted_on == "validation split"
    for path, row in theirs.items():
        # same decoding, resizing and engine: only the backbone's batch composition differs
        assert float(ours[path]["score"]) == pytest.approx(float(row["score"]), rel=1e-5, abs=1e-6)
        assert ours[path]["pred_label"] == row["pred_label"]
        normalized = float(post.normalize_scores(torch.tensor([float(ours[path]["score"])])))
        assert float(ours[path]["normalized_score"]) == pytest.approx(normalized, abs=1e-6)
        # output names keep the subfolder, so test/good/000.png and test/spot/000.png do not collide
        assert Path(ours[path]["map"]).name == "__".join(Path(path).relative_to(cat / "test").with_suffix(".png").parts)
        assert Path(ours[path]["map"]).is_file() and Path(ours[path]["overlay"]).is_file()


def test_unreadable_files_are_listed_and_the_rest_is_scored(trained, tmp_path):
    run_dir, cat = trained
    inputs = tmp_path / "in"
    shutil.copytree(cat / "test" / "good", inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG but not really")
    (inputs / "notes.txt").write_text("not an image: skipped in folder mode")
    assert main([f"run_dir={run_dir}", f"input={inputs}", f"output={tmp_path / 'out'}"]) == 1
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert sorted(Path(p).name for p in rows) == ["000.png", "001.png"]
    with (tmp_path / "out" / "failed.csv").open() as f:
        failed = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in failed] == ["broken.png"]
    assert "cannot read image" in failed[0]["cause"]


def test_non_square_and_grayscale_images_get_maps_at_their_own_size(trained, tmp_path):
    run_dir, _ = trained
    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(inputs / "wide.png")
    Image.fromarray(rng.integers(0, 255, (70, 30), dtype=np.uint8), mode="L").save(inputs / "gray.png")
    assert main([f"run_dir={run_dir}", f"input={inputs}/*.png", f"output={tmp_path / 'png'}"]) == 0
    rows = {Path(p).name: r for p, r in read_rows(tmp_path / "png" / "predictions.csv").items()}
    wide = Image.open(rows["wide.png"]["map"])
    assert wide.size == (80, 48) and np.asarray(wide).dtype == np.uint16  # 16-bit, the image's own size
    assert Image.open(rows["gray.png"]["map"]).size == (30, 70)
    assert Image.open(rows["gray.png"]["overlay"]).size == (30, 70)
    area = int(rows["wide.png"]["anomalous_area_px"])
    assert 0 <= area <= 80 * 48 and float(rows["wide.png"]["anomalous_area_fraction"]) == pytest.approx(area / (80 * 48), abs=1e-6)
    # the 16-bit map is the normalised map: pixels at or above the pixel threshold are >= 0.5
    assert int((np.asarray(wide) >= 32768).sum()) == pytest.approx(area, abs=2)

    assert main([f"run_dir={run_dir}", f"input={inputs}", f"output={tmp_path / 'npy'}", "maps=npy", "mode=resident"]) == 0
    rows_npy = {Path(p).name: r for p, r in read_rows(tmp_path / "npy" / "predictions.csv").items()}
    raw = np.load(rows_npy["wide.png"]["map"])
    assert raw.shape == (48, 80) and raw.dtype == np.float32
    post, _ = load_postprocessor(run_dir / "postprocess.json")
    assert int((raw >= post.pixel_threshold).sum()) == int(rows_npy["wide.png"]["anomalous_area_px"])
    assert float(rows_npy["wide.png"]["score"]) == pytest.approx(float(rows["wide.png"]["score"]), rel=1e-4)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiled_hydra.predict", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_unfinished_or_foreign_run_dirs_are_one_line_errors(trained, tmp_path):
    run_dir, cat = trained
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "checkpoints" / "slot_002.pt").unlink()
    proc = cli(f"run_dir={unfinished}", f"input={cat / 'test'}", f"output={tmp_path / 'o1'}")
    assert proc.returncode != 0 and "not trained" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir, foreign)
    path = foreign / "checkpoints" / "slot_001.pt"
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "fingerprint": "0123456789abcdef"}, path)  # as another version would have hashed it
    assert main([f"run_dir={foreign}", f"input={cat / 'test'}", f"output={tmp_path / 'o2'}"]) == 2

    assert main([f"run_dir={tmp_path / 'nope'}", f"input={cat / 'test'}"]) == 2
    assert main([f"run_dir={run_dir}", f"input={tmp_path / 'none' / '*.png'}", f"output={tmp_path / 'o3'}"]) == 2
    assert main([f"run_dir={run_dir}", f"input={cat}", f"output={run_dir / 'preds'}"]) == 2
    assert main([f"run_dir={run_dir}", "input=x", "colour=red"]) == 2
