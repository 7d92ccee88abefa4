"""The run directory as a new user meets it: re-runs with other settings, resumed costs after a real
kill -9, two processes in one directory, one-line errors, damaged checkpoints, checkpoint size,
progress and W&B. Real Hydra, real processes where the process boundary is the point, tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ACCURACY, ENV, REPO, assert_one_line, wait_for
from tiled_hydra.analysis.wandb_reader import read_offline_run
from tiled_hydra.config import validate
from tiled_hydra.errors import ConfigError, DataError
from tiled_hydra.rundir import config_fingerprint, differing_keys, identity, slot_fingerprint, temp_path


# -- 1: another configuration in an existing run dir is refused; skip only on an equal fingerprint --
def test_fingerprint_covers_weight_settings_only(compose_cfg, tiny):
    base = tiny.canonical("sm256")
    reference = config_fingerprint(compose_cfg(base))
    assert config_fingerprint(compose_cfg(base + ["trainer.precision=64-true"])) != reference
    assert config_fingerprint(compose_cfg(base + ["model.net.n_features=50"])) != reference
    # Where it runs, what it logs and how it reports change no weight: same run.
    for neutral in ("trainer.accelerator=cpu", "logger=wandb", "speed.enabled=true", "report.overlays=1", "progress=false",
                    "keep_checkpoints=false"):
        assert config_fingerprint(compose_cfg(base + [neutral])) == reference, neutral
    old, new = identity(compose_cfg(base)), identity(compose_cfg(base + ["model=patchcore"]))
    assert "model.name padim -> patchcore" in differing_keys(old, new)


def test_slot_fingerprint_leaves_out_what_only_the_evaluation_reads(compose_cfg, tiny):
    base = tiny.canonical("sm256")
    reference = compose_cfg(base)
    for evaluation_only in ("metrics.resolution=setup", "merge=max", "speed.repeats=3", "inference.mode=resident"):
        other = compose_cfg(base + [evaluation_only])
        assert slot_fingerprint(other) == slot_fingerprint(reference), evaluation_only  # the slots are reused ...
        if evaluation_only != "inference.mode=resident":  # (how, not what, is computed)
            assert config_fingerprint(other) != config_fingerprint(reference), evaluation_only  # ... the results are not
    for weights in ("model.net.n_features=50", "seed=1", "inference.features=whole_image", "dataset.category=other"):
        assert slot_fingerprint(compose_cfg(base + [weights])) != slot_fingerprint(reference), weights


def test_rerun_with_other_settings_is_refused_and_overwrites_nothing(main_cli, trained_run, tiny, tmp_path):
    # The finished sm256 run without its results.json: the command finds its slot trained, evaluates,
    # and (keep_checkpoints=false) deletes the slot checkpoint once results.json is written.
    run_dir = trained_run("padim", "sm256").copy(tmp_path / "D")
    (run_dir / "results.json").unlink()
    args = tiny.canonical("sm256") + ["keep_checkpoints=false"]
    first = main_cli(args, run_dir)
    assert first.code == 0, first.err[-3000:]
    assert f"run dir: {run_dir}; to resume an interrupted run: python -m tiled_hydra" in first.out.splitlines()[0]
    assert "slot_000 found trained" in first.out
    results = (run_dir / "results.json").read_bytes()
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "name: padim" in config and json.loads(results)["resumed_slots"] == 1
    # keep_checkpoints=false: the slot checkpoint is gone, its record and the results stay.
    assert not list((run_dir / "checkpoints").glob("*.pt"))
    record = json.loads((run_dir / "checkpoints" / "slot_000.json").read_text())
    assert json.loads(results)["checkpoint_bytes"] == record["checkpoint_bytes"] > 0

    other = main_cli(tiny.canonical("sm256") + ["model=patchcore"], run_dir)
    assert_one_line(other.code, other.err, "model.name padim -> patchcore", "hydra.run.dir", str(run_dir), expected_code=2)
    assert (run_dir / "results.json").read_bytes() == results
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config

    same = main_cli(args, run_dir)
    assert same.code == 0 and "read, not recomputed" in same.out and "finished earlier" in same.out
    assert (run_dir / "results.json").read_bytes() == results

    # Without results.json the slot records still name the configuration: refused, nothing retrained.
    (run_dir / "results.json").unlink()
    mtime = (run_dir / "checkpoints" / "slot_000.json").stat().st_mtime_ns
    other = main_cli(tiny.canonical("sm256") + ["model.net.n_features=50"], run_dir)
    assert_one_line(other.code, other.err, "model.net.n_features 100 -> 50", expected_code=2)
    assert (run_dir / "checkpoints" / "slot_000.json").stat().st_mtime_ns == mtime
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config


# -- 2 and 3: a real kill -9, resumed costs; a second process in the same run dir; W&B --------------------
@pytest.mark.slow
def test_lock_kill_and_resume(main_cli, trained_run, tiny, tmp_path):
    """FastFlow on ENS4 (four slots) with W&B offline and progress bars: the job is stopped as soon
    as slot 0 is saved, two other commands are refused its run dir, it is killed -9, and a re-run
    resumes it to the numbers of an uninterrupted run."""
    from tiled_hydra.slots.store import busy_seconds

    run_dir = tmp_path / "D"
    args = [o for o in tiny.canonical("ens4", "fastflow") if not o.startswith("logger=")]
    args += ["logger=wandb", "logger.mode=offline", "progress=true", "report.overlays=2"]
    command = [sys.executable, "-m", "tiled_hydra", *args, f"hydra.run.dir={run_dir}"]
    log = (tmp_path / "holder.log").open("w")  # a file, not a pipe: a full pipe would block the job
    holder = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "slot_000.json").exists(), holder)
        os.kill(holder.pid, signal.SIGSTOP)  # it holds the lock while the others try
        same = main_cli(args, run_dir)
        assert_one_line(same.code, same.err, f"{run_dir} is in use by pid {holder.pid}", expected_code=2)
        other = main_cli(tiny.canonical("ens4", "patchcore"), run_dir)
        assert_one_line(other.code, other.err, f"is in use by pid {holder.pid}", expected_code=2)
        assert "name: fastflow" in (run_dir / ".hydra" / "config.yaml").read_text()
        os.kill(holder.pid, signal.SIGKILL)  # kill -9 mid-run
    finally:
        holder.kill()
        holder.wait()
        log.close()
    done = sorted((run_dir / "checkpoints").glob("slot_*.json"))
    assert 1 <= len(done) < 4 and not (run_dir / "results.json").exists()

    resumed = main_cli(args, run_dir)  # the same command again, in this process
    assert resumed.code == 0, resumed.err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("slot_*.json"))]
    assert len(records) == 4 and results["resumed_slots"] == len(done)
    # Costs cover every slot, also those trained by the killed process ...
    assert results["train_seconds"] == pytest.approx(sum(r["seconds"] for r in records), abs=1e-3)
    assert results["train_peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in records) > 0
    assert results["checkpoint_bytes"] == sum(p.stat().st_size for p in (run_dir / "checkpoints").glob("slot_*.pt"))
    # ... and the wall time is the time some slot was training: the pause between kill and resume is not counted.
    intervals = [(r["started"], r["finished"]) for r in records]
    assert results["train_wall_seconds"] == pytest.approx(busy_seconds(intervals), abs=1e-2)
    assert results["train_wall_seconds"] < max(r["finished"] for r in records) - min(r["started"] for r in records)
    assert all(len(r["losses"]) == 20 for r in records)  # one loss per step (model.max_steps=20)
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    assert "name: fastflow" in (run_dir / ".hydra" / "config.yaml").read_text()
    # The same numbers as an uninterrupted run (FastFlow on one thread is deterministic; slot k is seeded seed + k).
    reference = trained_run("fastflow", "ens4").results
    for key in ACCURACY:
        assert results[key] == pytest.approx(reference[key], abs=1e-6), key
    # Progress: the run dir is the first thing said; bars over slots and steps, with the loss.
    assert f"run dir: {run_dir}" in resumed.out.splitlines()[0]
    assert "slots:" in resumed.out and "slot_003" in resumed.out and "train_loss" in resumed.out
    # W&B: per-slot curves (the killed process' slots too), costs and results.
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    record = read_offline_run(runs[-1])
    for slot in range(4):
        assert record["summary"][f"slot_{slot:03d}/train_loss"] == pytest.approx(records[slot]["losses"][-1])
        assert record["summary"][f"slot_{slot:03d}/seconds"] == pytest.approx(records[slot]["seconds"])
    assert record["summary"]["resumed_slots"] == len(done)
    assert record["summary"]["pixel_AUPRO"] == pytest.approx(results["pixel_AUPRO"])
    assert record["summary"]["image_AUROC"] == pytest.approx(results["image_AUROC"])
    assert any(p.suffix == ".png" for p in runs[-1].rglob("media/images/*"))


# -- 4: one line naming the key or file, before any data loads ----------------------------------------
@pytest.mark.parametrize("override, message", [
    ("setup.tile_size=256.5", "setup.tile_size=256.5"),
    ("setup.tile_size=abc", "setup.tile_size='abc'"),
    ("seed=abc", "seed='abc'"),
    ("seed=-1", "seed=-1"),
    ("setup.image_size=[512,0]", "setup.image_size"),
    ("merge.score=median", "merge.score='median'"),
    ("speed.repeats=0", "speed.repeats=0"),
    ("model.batch_size=0", "model.batch_size=0"),
    ("trainer.precision=17", "trainer.precision=17"),
    ("trainer.accelerator=tpu7", "trainer.accelerator='tpu7'"),
    ("+trainer.max_epochs=2", "use model.max_epochs"),
    ("+trainer.nonsense=1", "trainer.nonsense"),
    ("model.net.n_features=abc", "model.net.n_features='abc'"),
    ("+model.net.nonsense=1", "model.net.nonsense: not a setting of Padim"),
    ("dataset.category=7", "dataset.category=7"),
    ("keep_checkpoints=maybe", "keep_checkpoints='maybe'"),
    ("progress=sometimes", "progress='sometimes'"),
    ("metrics.aupro_fpr_limit=0", "metrics.aupro_fpr_limit=0"),
])
def test_validation_names_the_key(compose_cfg, tiny, override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(tiny.canonical("sm256") + [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_shipped_option_validates(compose_cfg):
    from tiled_hydra.config import group_options

    for group in ("model", "dataset", "backbone", "merge", "logger", "setup"):
        for option in group_options(group):
            setup = [] if group == "setup" else ["+setup=ens9"]
            prefix = "+" if group == "setup" else ""
            validate(compose_cfg(setup + [f"{prefix}{group}={option}"]))
    validate(compose_cfg(["+setup=ens9", "experiment=paper"]))


@pytest.mark.parametrize("extra, message", [
    (["model=nope"], "model=nope: no such option"),
    (["+setup=ens99"], "+setup=ens99: no such option"),
    (["setup.tile_size=abc"], "setup.tile_size='abc'"),
    (["+trainer.max_epochs=2"], "trainer.max_epochs"),
    (["model.net.nonsense=1"], "nonsense"),  # Hydra's own composition error, as one line
    # Validation comes before data: the broken dataset path is never reached.
    (["merge.score=median", "dataset.root=/does/not/exist"], "merge.score='median'"),
])
def test_cli_errors_are_one_line(main_cli, tiny, tmp_path, extra, message):
    base = [o for o in tiny.canonical("sm256") if not o.startswith("+setup")]
    setup = [] if any(e.startswith("+setup") for e in extra) else ["+setup=sm256"]
    ran = main_cli(setup + base + extra, tmp_path / "run")
    assert_one_line(ran.code, ran.err, message, expected_code=2)
    assert "HYDRA_FULL_ERROR" not in ran.err and not (tmp_path / "run").exists()


def test_help_says_setup_is_required_and_hides_internal_groups(main_cli):
    ran = main_cli(["--help"])
    assert ran.code == 0
    assert "+setup= is required: ens4, ens9, sm256, sm512, st4, st9" in ran.out
    assert "model=" in ran.out and "[padim]" in ran.out and "+sweep=" in ran.out
    assert "_job_dirs" not in ran.out


def test_hydra_flags_still_reach_hydra(main_cli):
    ran = main_cli(["+setup=sm256", "seed=3", "--cfg", "job", "-p", "seed"])
    assert ran.code == 0 and ran.out.strip() == "3", ran.err


# -- 5: damaged and unreadable checkpoints ------------------------------------------------------------
def test_damaged_checkpoints_are_moved_aside_and_retrained(trained_run, tmp_path, caplog):
    from tiled_hydra.pipeline import train

    cached = trained_run("padim", "ens4")
    run_dir = cached.copy(tmp_path / "run")
    (run_dir / "results.json").unlink()
    ckpt = run_dir / "checkpoints"
    truncated, overwritten = ckpt / "slot_001.pt", ckpt / "slot_002.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(overwritten.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # same size, other bytes (NaN weights)
    overwritten.write_bytes(bytes(data))
    again = train(cached.cfg, run_dir).results
    assert again["resumed_slots"] == 2
    for name in ("slot_001.pt", "slot_002.pt"):
        assert f"{name} is damaged" in caplog.text
        assert (ckpt / f"{name}.damaged").exists()
    for key in ACCURACY:
        assert again[key] == pytest.approx(cached.results[key], abs=1e-6), key


def test_unreadable_checkpoint_is_one_line_naming_the_file(trained_run, tmp_path):
    from tiled_hydra.build import build_run

    run = build_run(trained_run("padim", "sm256").cfg, tmp_path)
    run.store.checkpoint_path(0).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError) as err:
        run.store.load(0)
    message = str(err.value)
    assert str(run.store.checkpoint_path(0)) in message and "delete it to retrain that slot" in message
    assert "\n" not in message


def test_temporary_names_are_unique(tmp_path):
    target = tmp_path / "slot_000.pt"
    names = {temp_path(target) for _ in range(20)}
    assert len(names) == 20 and all(n.parent == tmp_path for n in names)


# -- 6: checkpoint size ----------------------------------------------------------------------------
def test_padim_checkpoint_stores_the_triangle_exactly(trained_run):
    from tiled_hydra.build import build_run
    from tiled_hydra.models.padim.torch_model import join_row_blocks

    cached = trained_run("padim", "sm256")
    run = build_run(cached.cfg, cached.run_dir / "checkpoints")
    model = run.store.load(0)
    whitening = join_row_blocks(model.model.whitening_blocks)  # (P, D, D), lower-triangular
    p, d, _ = whitening.shape
    payload = torch.load(run.store.checkpoint_path(0), weights_only=True)
    state = payload["state"]
    assert "model.whitening" not in state and state["model.whitening_tril"].shape == (p, d * (d + 1) // 2)
    assert torch.equal(whitening, whitening.tril())  # nothing above the diagonal was lost
    assert state["model.whitening_tril"].dtype == torch.float32  # float32 as computed
    # Size: the triangle (D(D+1)/2 of D^2 floats), the rest of the state and the calibration statistics
    # are small beside it.
    triangle_bytes = p * d * (d + 1) // 2 * 4
    assert triangle_bytes < cached.results["checkpoint_bytes"] < triangle_bytes * 1.1


@pytest.mark.slow  # the process boundary is what is tested
def test_sigterm_while_training_fails_the_run_and_keeps_its_slots(tiny, tmp_path):
    """SIGTERM (a scheduler's preemption, kill, docker stop) mid-slot: Lightning turns it into a
    SystemExit without a code, which exited 0 with nothing written. The run must fail in one line,
    keep its run dir and leave no results (outside a slot's training the command's own handler
    says the same)."""
    run_dir = tmp_path / "T"
    args = [o for o in tiny.canonical("ens4", "fastflow") if not o.startswith("model.max_steps=")]
    args += ["model.max_steps=100000", "model.max_epochs=-1"]  # slot 0 trains until it is stopped
    log = (tmp_path / "job.log").open("w")
    job = subprocess.Popen([sys.executable, "-m", "tiled_hydra", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV,
                           stdout=log, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "slot_000.lock").exists(), job)
        time.sleep(2)  # inside trainer.fit of slot 0
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
        log.close()
    assert job.returncode == 1, err[-2000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1] and err.strip().splitlines()[-1].startswith("tiled_hydra: error:")
    assert run_dir.is_dir() and not (run_dir / "results.json").exists()
