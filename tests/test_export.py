"""Export and the standalone runtime: graphs and manifest of a trained run, scored with onnxruntime,
numpy and Pillow only, equal to the torch engine; every user mistake one line."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from tests.helpers import ENV, REPO, assert_one_line  # noqa: E402
from tiled_hydra import __version__  # noqa: E402
from tiled_hydra.build import build_data, open_trained_run  # noqa: E402
from tiled_hydra.cli.export import main as export_main  # noqa: E402
from tiled_hydra.cli.predict import main as predict_main  # noqa: E402
from tiled_hydra.export.compare import agreement  # noqa: E402
from tiled_hydra.export.onnx import export_run  # noqa: E402
import tiled_hydra_runtime  # noqa: E402
from tiled_hydra_runtime.manifest import MANIFEST_FILE, file_sha256  # noqa: E402

# Equal up to float rounding: convolutions, matrix products and sums run in another order in
# onnxruntime than in torch (~1e-7 relative per operation), on maps normalised to [0, 1].
TOLERANCE = 1e-4
# EfficientAD's default precision is bfloat16 (CPU autocast). The graph rounds where autocast
# rounds, but a float32 sum within float32 rounding of a bfloat16 rounding boundary rounds either
# way depending on the summation order (oneDNN's vs onnxruntime's): ~1e-4 of a convolution's
# outputs move by one bfloat16 step (1/128 relative), and the moves add up over the networks' depth.
BF16_TOLERANCE = 1e-3
EXPORTABLE = ["padim", "patchcore", "fastflow", "reverse_distillation", "padim_ipca", "efficient_ad"]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """exported(model, setup, *extra) -> (run dir, artifact), each exported once per module."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def get(model: str, setup: str, *extra: str) -> tuple[Path, Path]:
        key = (model, setup, extra)
        if key not in cache:
            run_dir = trained_run(model, setup, *extra).run_dir
            artifact = tmp_path_factory.mktemp(f"export_{model}_{setup}") / "artifact"
            export_run(run_dir, artifact)
            cache[key] = run_dir, artifact
        return cache[key]

    return get


def images_of(run_dir: Path) -> torch.Tensor:
    cfg, run = open_trained_run(run_dir, device="cpu")
    return build_data(cfg, run.grid).test.images


def assert_equal_to_engine(run_dir: Path, artifact: Path, tolerance: float = TOLERANCE):
    images = images_of(run_dir)
    maps, scores = tiled_hydra_runtime.load(artifact, threads=1).predict(images.numpy())
    result = agreement(run_dir, images, maps, scores)
    assert result.images == len(images) >= 6
    assert result.max_map_difference <= tolerance, result
    assert result.max_score_difference <= tolerance, result
    assert result.labels_identical, result
    return result


# -- equal to the engine --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", EXPORTABLE)
def test_runtime_maps_and_labels_equal_the_engines(exported, model):
    run_dir, artifact = exported(model, "ens9")
    assert_equal_to_engine(run_dir, artifact, BF16_TOLERANCE if model == "efficient_ad" else TOLERANCE)


def test_single_model_setup_with_cross_fitted_thresholds_equals_the_engine(exported):
    # the canonical padim sm256 run has no validation split: its postprocess.json is fitted on the test set
    run_dir, artifact = exported("padim", "sm256")
    assert assert_equal_to_engine(run_dir, artifact).labels_identical


def test_whole_image_features_calibration_and_window_equal_the_engine(exported):
    # one shared slot over 9 overlapping tiles: 2 normal validation images give it 18 calibration tiles,
    # enough for per-position statistics (calibration.npz); Hann weights where tiles overlap
    run_dir, artifact = exported("padim", "st9", "inference.features=whole_image", "merge.calibration=slot_position",
                                 "merge.window=hann", "merge.score=max")
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    assert manifest["features"] == "whole_image"
    assert (manifest["merge"]["score"], manifest["merge"]["window"], manifest["merge"]["calibration"]) == \
        ("max", "hann", "slot_position")
    assert set(np.load(artifact / "calibration.npz")) == {"slot_000_median", "slot_000_spread"}
    assert_equal_to_engine(run_dir, artifact)


def test_artifact_holds_one_backbone_one_graph_per_slot_and_their_hashes(exported):
    run_dir, artifact = exported("padim", "ens9")
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    slots = [f"slot_{k:03d}.onnx" for k in range(9)]
    assert sorted(manifest["files"]) == ["backbone.onnx", *slots]
    assert sorted(p.name for p in artifact.iterdir()) == sorted([MANIFEST_FILE, "backbone.onnx", *slots])
    for name, digest in manifest["files"].items():
        assert file_sha256(artifact / name) == digest
    assert [s["tiles"] for s in manifest["graphs"]["slots"]] == [[k] for k in range(9)]
    assert manifest["grid"] == {"image_size": [64, 64], "tile_size": [32, 32], "stride": [16, 16]}
    assert manifest["postprocess"]["postprocessor"] == json.loads((run_dir / "postprocess.json").read_text())["postprocessor"]
    assert manifest["tiled_hydra_version"] == __version__
    # the backbone is stored once: a slot graph holds PaDiM's own statistics, no backbone weight
    names = {i.name for i in onnx.load(artifact / "slot_000.onnx").graph.initializer}
    assert {"blocks.0", "blocks.1", "blocks.2", "channel_index"} <= names and not any("conv" in n for n in names), names


# -- the runtime without torch ------------------------------------------------------------------------------------
def folder_of_new_images(root: Path, cat: Path) -> Path:
    """Test images plus the kinds a camera writes: grey, RGBA, 16-bit grey, another size, and a broken file."""
    folder = root / "new"
    (folder / "line2").mkdir(parents=True)
    for k, path in enumerate(sorted((cat / "test").rglob("*.png"))[:3]):
        shutil.copy(path, folder / f"part_{k}.png")
    rgb = Image.open(sorted((cat / "test").rglob("*.png"))[3]).convert("RGB")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("RGBA").save(folder / "line2" / "rgba.png")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(folder / "grey16.png")
    rgb.resize((100, 70)).save(folder / "line2" / "wide.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {r["path"]: r for r in csv.DictReader(f)}


BLOCKED = ["torch", "torchvision", "lightning", "hydra", "omegaconf", "timm", "faiss", "scipy", "matplotlib"]


@pytest.mark.slow
def test_runtime_scores_a_folder_with_torch_blocked_like_predict_does(exported, data_roots, tmp_path, call):
    run_dir, artifact = exported("padim", "ens9")
    folder = folder_of_new_images(tmp_path, data_roots["synthetic64"] / "brick")
    script = (f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
              "from tiled_hydra_runtime.cli import main\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", script, f"artifact={artifact}", f"input={folder}",
                           f"output={tmp_path / 'onnx'}", "threads=1"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    # the broken file is reported in one line, the others are scored: exit 1, as predict
    line = assert_one_line(proc.returncode, proc.stderr, "broken.png", expected_code=1)
    assert line.startswith("tiled_hydra_runtime: unreadable: ")
    assert "7 images scored" in proc.stdout

    torch_run = call(predict_main, [f"run_dir={run_dir}", f"input={folder}", f"output={tmp_path / 'torch'}"])
    assert torch_run.code == 1
    ours, theirs = rows(tmp_path / "onnx" / "predictions.csv"), rows(tmp_path / "torch" / "predictions.csv")
    assert set(ours) == set(theirs)
    assert {Path(p).name for p in ours} == {"part_0.png", "part_1.png", "part_2.png", "grey.png", "rgba.png", "grey16.png",
                                            "wide.jpg"}
    for name, row in theirs.items():
        assert abs(float(ours[name]["normalized_score"]) - float(row["normalized_score"])) <= TOLERANCE, name
        assert ours[name]["pred_label"] == row["pred_label"], name
        # maps brought to the image's size (bilinear) in numpy and in torch: a pixel at the threshold may flip
        assert abs(float(ours[name]["anomalous_area_fraction"]) - float(row["anomalous_area_fraction"])) <= 0.001, name
        # the same map file name and encoding (16-bit PNG, normalised) at the image's own size
        assert Path(ours[name]["map"]).name == Path(row["map"]).name
        a, b = (np.asarray(Image.open(r["map"]), dtype=np.float64) / 65535 for r in (ours[name], row))
        assert a.shape == b.shape and np.abs(a - b).max() <= 2 * TOLERANCE, name
    with (tmp_path / "onnx" / "failed.csv").open() as f:
        assert [Path(r["path"]).name for r in csv.DictReader(f)] == ["broken.png"]


def test_predict_with_runtime_onnx_exports_once_and_matches_runtime_torch(exported, data_roots, tmp_path, call):
    run_dir, _ = exported("padim", "ens9")
    images = data_roots["synthetic64"] / "brick" / "test"
    for runtime in ("torch", "onnx"):
        assert call(predict_main, [f"run_dir={run_dir}", f"input={images}", f"output={tmp_path / runtime}",
                                   f"runtime={runtime}"]).code == 0
    assert (tmp_path / "onnx" / "export" / MANIFEST_FILE).is_file()  # exported on first use, into the output
    ours, theirs = rows(tmp_path / "onnx" / "predictions.csv"), rows(tmp_path / "torch" / "predictions.csv")
    assert set(ours) == set(theirs) and len(ours) == 6
    for name, row in theirs.items():
        assert abs(float(ours[name]["normalized_score"]) - float(row["normalized_score"])) <= TOLERANCE
        assert ours[name]["pred_label"] == row["pred_label"]
        assert Path(ours[name]["overlay"]).is_file()


# -- mistakes, one line each ------------------------------------------------------------------------------
def test_ddad_is_refused_in_one_line(trained_run, call, tmp_path):
    run_dir = trained_run("ddad", "sm256").run_dir
    result = call(export_main, [f"run_dir={run_dir}", f"output={tmp_path / 'out'}"])
    assert_one_line(result.code, result.err, "model ddad cannot be exported", "sampling loop", expected_code=2)
    assert not (tmp_path / "out").exists()


def test_unfinished_or_edited_run_dirs_or_outputs_inside_them_are_refused_in_one_line(trained_run, call, tmp_path):
    unfinished = trained_run("padim", "ens9").copy(tmp_path / "unfinished")
    (unfinished / "checkpoints" / "slot_004.pt").unlink()
    result = call(export_main, [f"run_dir={unfinished}", f"output={tmp_path / 'a'}"])
    assert_one_line(result.code, result.err, "1 of 9 slots are not trained", expected_code=1)

    edited = trained_run("padim", "ens9").copy(tmp_path / "edited")
    config = edited / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("epsilon: 0.01", "epsilon: 0.02"))
    result = call(export_main, [f"run_dir={edited}", f"output={tmp_path / 'b'}"])
    # the slots' fingerprint covers every setting that made them and the tiled_hydra version that wrote them
    assert_one_line(result.code, result.err, "belongs to another configuration", "model.net.epsilon 0.01 -> 0.02",
                    expected_code=2)

    result = call(export_main, [f"run_dir={edited}", f"output={edited / 'export'}"])
    assert_one_line(result.code, result.err, "inside the run dir", expected_code=2)

    result = call(export_main, [f"run_dir={tmp_path / 'nope'}", f"output={tmp_path / 'c'}"])
    assert_one_line(result.code, result.err, "is not a run directory", expected_code=2)


@pytest.mark.slow
def test_a_modified_graph_or_a_newer_manifest_is_refused_in_one_line(exported, data_roots, tmp_path):
    _, artifact = exported("padim", "ens9")
    damaged = Path(shutil.copytree(artifact, tmp_path / "damaged"))
    graph = bytearray((damaged / "slot_003.onnx").read_bytes())
    graph[-10] ^= 0xFF
    (damaged / "slot_003.onnx").write_bytes(bytes(graph))
    newer = Path(shutil.copytree(artifact, tmp_path / "newer"))
    manifest = json.loads((newer / MANIFEST_FILE).read_text())
    (newer / MANIFEST_FILE).write_text(json.dumps(manifest | {"format_version": 2}))
    for folder, needle, code in ((damaged, "slot_003.onnx does not match its sha256", 1),
                                 (newer, "this runtime reads format 1", 2)):
        proc = subprocess.run([sys.executable, "-m", "tiled_hydra_runtime", f"artifact={folder}", f"input={data_roots['synthetic64']}",
                               f"output={tmp_path / 'out'}"], env=ENV, capture_output=True, text=True)
        assert_one_line(proc.returncode, proc.stderr, needle, expected_code=code)


@pytest.mark.slow
def test_export_command_line_writes_an_artifact(exported, tmp_path):
    run_dir, _ = exported("padim", "sm256")
    proc = subprocess.run([sys.executable, "-m", "tiled_hydra.export", f"run_dir={run_dir}", f"output={tmp_path / 'a'}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported" in proc.stdout and (tmp_path / "a" / MANIFEST_FILE).is_file()
    help_text = subprocess.run([sys.executable, "-m", "tiled_hydra.export", "--help"], cwd=REPO, env=ENV,
                               capture_output=True, text=True).stdout
    assert "run_dir: ???" in help_text and "format: onnx" in help_text


def test_openvino_format_equals_the_engine_too(trained_run, tmp_path):
    pytest.importorskip("openvino")
    run_dir = trained_run("padim", "ens9").run_dir
    export_run(run_dir, tmp_path / "ov", "openvino")
    manifest = json.loads((tmp_path / "ov" / MANIFEST_FILE).read_text())
    assert manifest["format"] == "openvino" and manifest["graphs"]["backbone"] == "backbone.xml"
    assert {"backbone.xml", "backbone.bin", "slot_008.xml", "slot_008.bin"} <= set(manifest["files"])
    assert_equal_to_engine(run_dir, tmp_path / "ov")


def test_the_runtime_weights_overlaps_with_the_engines_windows():
    from tiled_hydra.core.calibration import WINDOWS, tile_window
    from tiled_hydra_runtime.merge import tile_window as runtime_window

    for kind in WINDOWS:
        ours, theirs = tile_window((96, 160), kind), runtime_window((96, 160), kind)
        assert (ours is None) == (theirs is None) == (kind == "flat")
        if ours is not None:
            np.testing.assert_allclose(theirs, ours.numpy(), rtol=0, atol=1e-7)
