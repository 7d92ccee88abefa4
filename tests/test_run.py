"""End-to-end runs on tiny data: every setup, resume after an interruption, bad inputs end the run
with one line and exit code 2 (usage) or 1 (the run failed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ACCURACY, MODELS_PER_SETUP, SETUPS, assert_one_line, mvtec_overrides, write_mvtec
from tiled_hydra.metrics import schema
from tiled_hydra.slots.trainer import SlotTrainer

RESULT_KEYS = {
    "image_AUROC", "pixel_AUPRO", "pixel_AUROC", "image_F1", "pixel_F1", "train_peak_mem_bytes",
    "infer_peak_mem_bytes", "mem_kind", "train_seconds", "infer_seconds", "infer_images_per_second",
    "num_tiles", "num_models", "setup", "model", "backbone", "dataset", "category", "seed",
    "resumed_slots", "checkpoint_bytes", "checkpoint_bytes_per_slot", "fingerprint", "merge_score",
}


@pytest.mark.parametrize("setup", SETUPS)
def test_every_setup_runs_end_to_end(trained_run, setup):
    run = trained_run("padim", setup)
    results = run.results
    assert RESULT_KEYS <= set(results) and results["merge_score"] == "mean"
    assert schema.problems(results) == []
    for key in ACCURACY:
        assert 0.0 <= results[key] <= 1.0, key
    assert results["num_models"] == MODELS_PER_SETUP[setup] and results["resumed_slots"] == 0
    checkpoints = sorted((run.run_dir / "checkpoints").glob("slot_*.pt"))
    assert len(checkpoints) == MODELS_PER_SETUP[setup]
    assert results["checkpoint_bytes"] == sum(p.stat().st_size for p in checkpoints)
    assert results["checkpoint_bytes_per_slot"] == max(p.stat().st_size for p in checkpoints)
    # overlays only where asked for (report.overlays=2 on sm512), the speed protocol only where enabled (st9)
    assert bool(list((run.run_dir / "overlays").glob("*.png"))) == (setup == "sm512")
    if setup == "st9":
        assert results["latency_ms"] > 0 and results["throughput_images_per_second"] > 0
        assert results["throughput_batch_size"] == 2
    else:
        assert "latency_ms" not in results
    written = json.loads((run.run_dir / "results.json").read_text())
    assert written["fingerprint"] == results["fingerprint"] and set(written) == set(results)


def test_without_a_validation_split_thresholds_are_cross_fitted(trained_run):
    # sm256 runs on the MVTec tree (no validation split): the reported labels come from the 2-fold
    # cross-fit; postprocess.json (for predict) is fitted on every test image and says so.
    run = trained_run("padim", "sm256")
    post = json.loads((run.run_dir / "postprocess.json").read_text())
    assert "no validation split" in json.dumps(post)
    assert run.results["calibration_fitted_on"] == "training images"
    assert trained_run("padim", "ens4").results["calibration_fitted_on"] == "validation normal images"


def test_resume_after_interruption_skips_trained_slots(tiny, trained_run, compose_cfg, tmp_path, monkeypatch):
    from tiled_hydra.pipeline import train

    reference = trained_run("padim", "ens4").results
    cfg = compose_cfg(tiny.canonical("ens4"))
    fit = SlotTrainer.fit
    fitted: list[int] = []

    def interrupt_at_slot_2(self, slot, images, **kwargs):
        if slot == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run
        fitted.append(slot)
        return fit(self, slot, images, **kwargs)

    monkeypatch.setattr(SlotTrainer, "fit", interrupt_at_slot_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path)
    assert fitted == [0, 1]
    assert not (tmp_path / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("slot_*.json")) == ["slot_000.json", "slot_001.json"]

    fitted.clear()
    monkeypatch.setattr(SlotTrainer, "fit", lambda self, slot, images, **kw: fitted.append(slot) or fit(self, slot, images, **kw))
    resumed = train(cfg, tmp_path).results
    assert fitted == [2, 3]  # slots 0 and 1 came from their checkpoints
    assert resumed["resumed_slots"] == 2
    for key in ACCURACY:
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key


def test_checkpoints_carry_the_slot_fingerprint(trained_run, compose_cfg, tiny):
    from tiled_hydra.rundir import slot_fingerprint

    run = trained_run("padim", "sm256")
    payload = torch.load(run.run_dir / "checkpoints" / "slot_000.pt", weights_only=True)
    assert payload["fingerprint"] == slot_fingerprint(run.cfg) == run.results["slot_fingerprint"]
    # A different configuration must retrain rather than silently reuse the slot.
    other = compose_cfg(tiny.canonical("sm256") + ["model.net.n_features=50"])
    assert payload["fingerprint"] != slot_fingerprint(other)


# -- bad inputs: one line, nothing left behind ------------------------------------------------------
def corrupt_image(root):
    (root / "widget/train/good/000.png").write_bytes(b"not a png")


def drop_mask(root):
    (root / "widget/ground_truth/spot/000_mask.png").unlink()


def wrong_mask_size(root):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "widget/ground_truth/spot/000_mask.png")


def empty_train(root):
    for f in (root / "widget/train/good").iterdir():
        f.unlink()


@pytest.mark.parametrize(
    "breakage, extra, message, code",
    [
        (None, ["model=nonexistent"], "model/nonexistent", 2),
        (None, ["dataset=nonexistent"], "dataset/nonexistent", 2),
        (None, ["backbone=nonexistent"], "backbone/nonexistent", 2),
        (None, ["dataset.root=/does/not/exist"], "/does/not/exist", 1),
        (None, ["dataset.category=nope"], "nope", 1),
        (corrupt_image, [], "000.png", 1),
        (drop_mask, [], "mask", 1),
        (wrong_mask_size, [], "size", 1),
        (empty_train, [], "train", 1),
    ],
)
def test_bad_input_ends_the_run_with_one_line(main_cli, tmp_path, breakage, extra, message, code):
    root = write_mvtec(tmp_path / "data", n_train=3, n_good=1, n_bad=1)
    if breakage:
        breakage(root)
    ran = main_cli(mvtec_overrides(root) + extra, tmp_path / "run")
    assert_one_line(ran.code, ran.err, message, expected_code=code)
    # the failed job did nothing but log: its run dir is removed
    assert not (tmp_path / "run").exists()


def test_unknown_setup_and_missing_setup(main_cli, tmp_path):
    ran = main_cli(["+setup=ens99", "logger=none"], tmp_path / "a")
    assert_one_line(ran.code, ran.err, "setup/ens99", expected_code=2)
    ran = main_cli(["logger=none"], tmp_path / "b")
    assert_one_line(ran.code, ran.err, "+setup=NAME", "ens9", expected_code=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
