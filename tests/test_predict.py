"""`python -m tiled_hydra.predict`: a trained run dir scores new images, never modifying the run dir.

The run is the cached ENS4 PaDiM run on synthetic data with a validation split (its thresholds are
fitted there); the entry point runs in this process, its exit code and output captured.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import assert_one_line
from tiled_hydra.cli.predict import main
from tiled_hydra.core.postprocess import load_postprocessor
from tiled_hydra.reporting.results import TEST_PREDICTIONS_FILE


def read_rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def trained(trained_run, data_roots) -> tuple[Path, Path]:
    """The finished run and its dataset's category folder (test/ holds the run's test images)."""
    return trained_run("padim", "ens4").run_dir, data_roots["synthetic64"] / "brick"


def test_predict_on_the_runs_test_images_reproduces_its_scores_and_labels(call, trained, tmp_path):
    run_dir, cat = trained
    before = snapshot(run_dir)
    assert call(main, [f"run_dir={run_dir}", f"input={cat / 'test'}", f"output={tmp_path}"]).code == 0
    assert snapshot(run_dir) == before  # nothing in the run dir is modified
    ours = read_rows(tmp_path / "predictions.csv")
    theirs = read_rows(run_dir / TEST_PREDICTIONS_FILE)
    assert set(ours) == set(theirs) and len(ours) == 6
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


def test_unreadable_files_are_listed_and_the_rest_is_scored(call, trained, tmp_path):
    run_dir, cat = trained
    inputs = tmp_path / "in"
    shutil.copytree(cat / "test" / "good", inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG but not really")
    (inputs / "notes.txt").write_text("not an image: skipped in folder mode")
    ran = call(main, [f"run_dir={run_dir}", f"input={inputs}", f"output={tmp_path / 'out'}"])
    assert ran.code == 1 and "broken.png" in ran.err
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert sorted(Path(p).name for p in rows) == ["000.png", "001.png"]
    with (tmp_path / "out" / "failed.csv").open() as f:
        failed = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in failed] == ["broken.png"]
    assert "cannot read image" in failed[0]["cause"]


def test_non_square_and_grayscale_images_get_maps_at_their_own_size(call, trained, tmp_path):
    run_dir, _ = trained
    rng = np.random.default_rng(1)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(inputs / "wide.png")
    Image.fromarray(rng.integers(0, 255, (70, 30), dtype=np.uint8), mode="L").save(inputs / "gray.png")
    assert call(main, [f"run_dir={run_dir}", f"input={inputs}/*.png", f"output={tmp_path / 'png'}"]).code == 0
    rows = {Path(p).name: r for p, r in read_rows(tmp_path / "png" / "predictions.csv").items()}
    wide = Image.open(rows["wide.png"]["map"])
    assert wide.size == (80, 48) and np.asarray(wide).dtype == np.uint16  # 16-bit, the image's own size
    assert Image.open(rows["gray.png"]["map"]).size == (30, 70)
    with Image.open(rows["gray.png"]["overlay"]) as overlay:  # the explained drawing (tests/test_overlays.py)
        assert overlay.format == "PNG"
    area = int(rows["wide.png"]["anomalous_area_px"])
    assert 0 <= area <= 80 * 48 and float(rows["wide.png"]["anomalous_area_fraction"]) == pytest.approx(area / (80 * 48), abs=1e-6)
    # the 16-bit map is the normalised map: pixels at or above the pixel threshold are >= 0.5
    assert int((np.asarray(wide) >= 32768).sum()) == pytest.approx(area, abs=2)

    assert call(main, [f"run_dir={run_dir}", f"input={inputs}", f"output={tmp_path / 'npy'}", "maps=npy", "mode=resident"]).code == 0
    rows_npy = {Path(p).name: r for p, r in read_rows(tmp_path / "npy" / "predictions.csv").items()}
    raw = np.load(rows_npy["wide.png"]["map"])
    assert raw.shape == (48, 80) and raw.dtype == np.float32
    post, _ = load_postprocessor(run_dir / "postprocess.json")
    assert int((raw >= post.pixel_threshold).sum()) == int(rows_npy["wide.png"]["anomalous_area_px"])
    assert float(rows_npy["wide.png"]["score"]) == pytest.approx(float(rows["wide.png"]["score"]), rel=1e-4)


@pytest.mark.parametrize("breakage, args, message, code", [
    ("unfinished", [], "not trained", 1),
    ("foreign", [], "written by another version", 1),
    (None, ["run_dir=NOPE"], "is not a run directory", 2),  # an argument that names no run: usage
    (None, ["input=NONE/*.png"], "no image files found", 1),
    (None, ["output=RUN/preds"], "inside the run dir", 2),
    (None, ["output=FILE/preds"], "is not writable", 2),  # under a regular file (root may write anywhere else)
    (None, ["colour=red"], "colour", 2),
    (None, ["maps=tiff"], "maps=tiff", 2),
    (None, ["batch_size=0"], "batch_size=0", 2),
])
def test_unfinished_or_foreign_run_dirs_and_bad_options_are_one_line_errors(call, trained, tmp_path, breakage, args,
                                                                            message, code):
    run_dir, cat = trained
    (tmp_path / "a_file").write_text("")
    if breakage:
        run_dir = shutil.copytree(run_dir, tmp_path / breakage)
        if breakage == "unfinished":
            (run_dir / "checkpoints" / "slot_002.pt").unlink()
        else:
            path = run_dir / "checkpoints" / "slot_001.pt"
            payload = torch.load(path, weights_only=True)
            torch.save({**payload, "fingerprint": "0123456789abcdef"}, path)  # as another version would have hashed it
    given = {"run_dir": str(run_dir), "input": str(cat / "test"), "output": str(tmp_path / "out")}
    for arg in args:
        key, value = arg.split("=", 1)
        given[key] = value.replace("NOPE", str(tmp_path / "nope")).replace("NONE", str(tmp_path / "none")).replace(
            "RUN", str(run_dir)).replace("FILE", str(tmp_path / "a_file"))
    ran = call(main, [f"{k}={v}" for k, v in given.items()])
    assert_one_line(ran.code, ran.err, message, expected_code=code)
    assert ran.err.startswith("tiled_hydra.predict: error:")


def test_help_prints_the_option_reference(call):
    ran = call(main, ["--help"])
    assert ran.code == 0 and ran.out.startswith("usage: tiled-hydra-predict")
    for key in ("run_dir:", "input:", "output:", "maps:", "batch_size:", "mode:", "device:"):
        assert key in ran.out, key


def test_required_options_are_named(call):
    ran = call(main, ["input=x"])
    assert_one_line(ran.code, ran.err, "run_dir=... is required", expected_code=2)
