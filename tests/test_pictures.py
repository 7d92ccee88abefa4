"""What a run leaves to look at: every test image's anomaly map at its own size (RUN_DIR/maps/, listed
in test_predictions.csv, encoded as predict encodes it) and overlays named for why they were chosen.
One tiny real run (PaDiM, SM256 scaled to 64 px, on synthetic 128 px images: maps are upsampled 2x to
the images' size)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from tests.conftest import CONF_DIR
from tiled_hydra.core.postprocess import load_postprocessor
from tiled_hydra.data.images import Sample, read_split
from tiled_hydra.errors import ConfigError
from tiled_hydra.pipeline import train
from tiled_hydra.reporting.maps import PNG_THRESHOLD_CODE, at_size, decode_png, maps_format, write_map
from tiled_hydra.reporting.results import COLUMN_NOTES, TEST_PREDICTIONS_FILE, write_test_predictions

SETUP_SIZE, IMAGE_SIZE = 64, 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors on two shared cores: one OpenMP thread is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def compose_run(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cfg = compose_run(["+setup=sm256", f"setup.image_size={SETUP_SIZE}", f"setup.tile_size={SETUP_SIZE}",
                       f"setup.stride={SETUP_SIZE}", "model=padim", "logger=none", "dataset.n_train=6", "dataset.n_val=4",
                       "dataset.n_test=6", f"dataset.resolution={IMAGE_SIZE}", f"dataset.root={tmp_path_factory.mktemp('data')}",
                       "report.overlays=4"])
    assert cfg.report.maps == "png"  # the default
    directory = tmp_path_factory.mktemp("run")
    train(cfg, directory)
    return directory


def rows_of(run_dir: Path) -> list[dict]:
    with (run_dir / TEST_PREDICTIONS_FILE).open() as f:
        return list(csv.DictReader(f))


def test_every_test_image_has_its_map_at_its_own_size(run_dir):
    rows = rows_of(run_dir)
    assert len(rows) == 6
    for row in rows:
        with Image.open(row["path"]) as image:
            width, height = image.size
        assert (height, width) == (IMAGE_SIZE, IMAGE_SIZE) != (SETUP_SIZE, SETUP_SIZE)  # a real upsampling
        with Image.open(run_dir / row["map"]) as map_file:
            assert map_file.size == (width, height) and np.asarray(map_file).dtype == np.uint16
    # one file per image, no other: test/good/000.png and test/crack/000.png do not collide
    assert sorted(p.name for p in (run_dir / "maps").iterdir()) == sorted(Path(r["map"]).name for r in rows)


def test_png_maps_put_the_pixel_threshold_at_32768(run_dir, tmp_path):
    post, _ = load_postprocessor(run_dir / "postprocess.json")
    for row in rows_of(run_dir):
        codes = np.asarray(Image.open(run_dir / row["map"]))
        # the CSV's area counts raw values >= the pixel threshold; the PNG codes >= 32768 are the same pixels
        assert int((codes >= PNG_THRESHOLD_CODE).sum()) == int(row["anomalous_area_px"])
        assert float(row["anomalous_area_fraction"]) == pytest.approx(int(row["anomalous_area_px"]) / codes.size, abs=1e-6)
        score = float(row["score"])
        assert int(row["pred_label"]) == int(score >= post.image_threshold)
        assert float(row["normalized_score"]) == pytest.approx(float(post.normalize_scores(torch.tensor([score]))), abs=1e-6)
    # a raw value exactly at the run's pixel threshold is normalised to 0.5 -> 32768 (0.5 * 65535 = 32767.5)
    raw = torch.full((3, 4), post.pixel_threshold)
    raw[0, 0] = post.map_min
    raw[2, 3] = post.map_max
    written = write_map(tmp_path / "probe", raw, post, "png")
    codes = np.asarray(Image.open(written)).astype(int)
    assert abs(codes[1, 1] - PNG_THRESHOLD_CODE) <= 1
    assert codes[0, 0] < PNG_THRESHOLD_CODE < codes[2, 3]


def test_the_csv_keeps_its_first_columns_and_documents_every_column(run_dir):
    with (run_dir / TEST_PREDICTIONS_FILE).open() as f:
        header = next(csv.reader(f))
    assert header[:4] == ["path", "label", "score", "pred_label"]  # what earlier readers index
    assert {"normalized_score", "anomalous_area_px", "map"} <= set(header)
    notes = (run_dir / "test_predictions.columns.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in notes] == header
    assert all(line == f"{c}: {COLUMN_NOTES[c]}" for line, c in zip(notes, header))


OVERLAY_NAME = re.compile(r"(highest_scored_defective|defective_below_image_threshold|lowest_scored_defective|"
                          r"normal_above_image_threshold|highest_scored_normal)_(\d+)_(\w+?)_(\d+)\.png")


def test_overlay_names_are_true_of_their_images(run_dir):
    post, _ = load_postprocessor(run_dir / "postprocess.json")
    rows = rows_of(run_dir)
    by_file = {tuple(Path(r["path"]).parts[-2:]): r for r in rows}
    defective = sorted((float(r["score"]) for r in rows if r["label"] == "1"), reverse=True)
    names = sorted(p.name for p in (run_dir / "overlays").glob("*.png"))
    assert len(names) == 4
    for name in names:
        tag, rank, kind, stem = OVERLAY_NAME.fullmatch(name).groups()
        row = by_file[(kind, f"{stem}.png")]
        score, label, rank = float(row["score"]), int(row["label"]), int(rank)
        below = score < post.image_threshold
        expected = {
            "highest_scored_defective": label == 1 and score == defective[rank - 1],
            "defective_below_image_threshold": label == 1 and below and score == defective[-rank],
            "lowest_scored_defective": label == 1 and not below and score == defective[-rank],
            "normal_above_image_threshold": label == 0 and not below,
            "highest_scored_normal": label == 0 and below,
        }[tag]
        assert expected, f"{name}: score {score}, label {label}, image threshold {post.image_threshold}"


def hand_made_split(tmp_path: Path, size: tuple[int, int]):
    """Two real image files of ``size`` (h, w), read as a dataset reads them (resized to 16 x 16)."""
    samples = []
    for i, label in enumerate((0, 1)):
        path = tmp_path / ("good" if label == 0 else "bad") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(size, 100 + 50 * i, dtype=np.uint8)).save(path)
        samples.append(Sample(path, label, "good" if label == 0 else "spot", None))
    return read_split(samples, (16, 16), "t", with_masks=False)


def test_npy_maps_round_trip_the_raw_map_at_a_non_square_size(run_dir, tmp_path):
    post, _ = load_postprocessor(run_dir / "postprocess.json")
    split = hand_made_split(tmp_path / "images", (30, 50))
    maps = torch.linspace(post.map_min, post.map_max, 2 * 16 * 16).reshape(2, 16, 16)
    out = tmp_path / "npy"
    out.mkdir()
    write_test_predictions(out, split, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), maps, [post, post], "npy")
    rows = rows_of(out)
    assert [Path(r["map"]).name for r in rows] == ["good__000.npy", "bad__001.npy"]
    for i, row in enumerate(rows):
        raw = np.load(out / row["map"])
        assert raw.dtype == np.float32 and raw.shape == (30, 50)  # (height, width) of the file
        assert np.array_equal(raw, at_size(maps[i], (30, 50)).numpy())
        assert int(row["anomalous_area_px"]) == int((raw >= post.pixel_threshold).sum())
    # the same maps as png: decoded, they are the normalised raw maps to within half a code
    png = tmp_path / "png"
    png.mkdir()
    write_test_predictions(png, split, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), maps, [post, post], "png")
    for row_png, row_npy in zip(rows_of(png), rows):
        decoded = decode_png(np.asarray(Image.open(png / row_png["map"])))
        expected = post.normalize_maps(torch.from_numpy(np.load(out / row_npy["map"]))).numpy()
        assert np.abs(decoded - expected).max() <= 0.5 / 65535 + 1e-7


def test_report_maps_false_writes_no_map(run_dir, tmp_path):
    cfg = compose_run(["+setup=sm256", "report.maps=false"])
    assert maps_format(cfg.report.maps) is None
    post, _ = load_postprocessor(run_dir / "postprocess.json")
    split = hand_made_split(tmp_path / "images", (20, 24))
    maps = torch.full((2, 16, 16), post.pixel_threshold + 1.0)  # every pixel anomalous
    write_test_predictions(tmp_path, split, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), maps, [post, post], None)
    assert not (tmp_path / "maps").exists()
    rows = rows_of(tmp_path)
    assert [r["map"] for r in rows] == ["", ""] and [r["anomalous_area_px"] for r in rows] == ["480", "480"]
    with pytest.raises(ConfigError, match="report.maps='jpg': choose png, npy or false"):
        maps_format("jpg")


def test_predict_writes_the_same_maps_and_column_notes(run_dir, tmp_path):
    from tiled_hydra.cli.predict import main

    first = rows_of(run_dir)[0]
    folder = Path(first["path"]).parent  # one kind's test images
    with pytest.raises(SystemExit) as done:
        main([f"run_dir={run_dir}", f"input={folder}", f"output={tmp_path}"])
    assert done.value.code == 0
    with (tmp_path / "predictions.csv").open() as f:
        theirs = {row["path"]: row for row in csv.DictReader(f)}
    ours = {row["path"]: row for row in rows_of(run_dir)}
    for path, row in theirs.items():
        run_codes = np.asarray(Image.open(run_dir / ours[path]["map"])).astype(int)
        predict_codes = np.asarray(Image.open(row["map"])).astype(int)
        # one engine, one upsampling, one encoding: only the backbone's batch composition differs
        assert np.abs(run_codes - predict_codes).max() <= 1
        assert Path(row["overlay"]).is_file()
    notes = dict(line.split(": ", 1) for line in (tmp_path / "predictions.columns.txt").read_text().splitlines())
    assert notes == {c: COLUMN_NOTES[c] for c in notes} and {"path", "score", "map", "overlay"} <= set(notes)
