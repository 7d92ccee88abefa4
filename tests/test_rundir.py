"""The run directory as a new user meets it (issue 13): re-runs with other settings, resumed
costs after a real kill -9, two processes in one directory, one-line errors, checkpoint size,
progress and W&B, and the Lightning warning filter.  Real processes, real Hydra, tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_run import REPO, tiny_overrides, write_mvtec
from tiled_hydra.errors import ConfigError, DataError
from tiled_hydra.rundir import config_fingerprint, differing_keys, identity, slot_fingerprint, temp_path
from tiled_hydra.pipeline import run
from tiled_hydra.config import validate
from tiled_hydra.analysis.wandb_reader import read_offline_run

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return write_mvtec(tmp_path_factory.mktemp("mvtec"))


def command(args: list[str], run_dir: Path | None) -> list[str]:
    return [sys.executable, "-m", "tiled_hydra", *args, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]


def cli(args: list[str], run_dir: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, run_dir), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stderr.strip().splitlines()


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- 1: another configuration in an existing run dir is refused; skip only on an equal fingerprint --
def test_fingerprint_covers_weight_settings_only(compose_cfg, mvtec_root):
    base = tiny_overrides("sm256", mvtec_root)
    reference = config_fingerprint(compose_cfg(base))
    assert config_fingerprint(compose_cfg(base + ["trainer.precision=64-true"])) != reference
    assert config_fingerprint(compose_cfg(base + ["model.net.n_features=50"])) != reference
    # Where it runs, what it logs and how it reports change no weight: same run.
    for neutral in ("trainer.accelerator=cpu", "logger=wandb", "speed.enabled=false", "report.overlays=1", "progress=false"):
        assert config_fingerprint(compose_cfg(base + [neutral])) == reference, neutral
    old, new = identity(compose_cfg(base)), identity(compose_cfg(base + ["model=patchcore"]))
    assert "model.name padim -> patchcore" in differing_keys(old, new)


def test_slot_fingerprint_leaves_out_what_only_the_evaluation_reads(compose_cfg, mvtec_root):
    base = tiny_overrides("sm256", mvtec_root)
    reference = compose_cfg(base)
    for evaluation_only in ("metrics.resolution=setup", "merge=max", "speed.repeats=3", "inference.mode=resident"):
        other = compose_cfg(base + [evaluation_only])
        assert slot_fingerprint(other) == slot_fingerprint(reference), evaluation_only  # the slots are reused ...
        if evaluation_only != "inference.mode=resident":  # (how, not what, is computed)
            assert config_fingerprint(other) != config_fingerprint(reference), evaluation_only  # ... the results are not
    for weights in ("model.net.n_features=50", "seed=1", "inference.features=whole_image", "dataset.category=other"):
        assert slot_fingerprint(compose_cfg(base + [weights])) != slot_fingerprint(reference), weights


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_and_overwrites_nothing(mvtec_root, tmp_path):
    run_dir = tmp_path / "D"
    first = cli(tiny_overrides("sm256", mvtec_root) + ["keep_checkpoints=false"], run_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "configure_optimizers" not in first.stderr  # issue item 8: the filter matches Lightning's text
    assert "slots:" not in first.stdout + first.stderr  # progress=auto and no terminal: no bars in logs
    assert first.stdout.splitlines()[0].endswith(f"run dir: {run_dir} (the same hydra.run.dir={run_dir} resumes an interrupted run)")
    results = (run_dir / "results.json").read_bytes()
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "name: padim" in config
    # keep_checkpoints=false: the slot checkpoint is gone, its record and the results stay.
    assert not list((run_dir / "checkpoints").glob("*.pt"))
    record = json.loads((run_dir / "checkpoints" / "slot_000.json").read_text())
    assert json.loads(results)["checkpoint_bytes"] == record["checkpoint_bytes"] > 0

    other = cli(tiny_overrides("sm256", mvtec_root) + ["model=patchcore"], run_dir)
    assert_one_line(other, "model.name padim -> patchcore", "hydra.run.dir", str(run_dir))
    assert (run_dir / "results.json").read_bytes() == results
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config

    same = cli(tiny_overrides("sm256", mvtec_root) + ["keep_checkpoints=false"], run_dir)
    assert same.returncode == 0 and "skipped" in same.stdout + same.stderr
    assert (run_dir / "results.json").read_bytes() == results

    # Without results.json the slot records still name the configuration: refused, nothing retrained.
    (run_dir / "results.json").unlink()
    mtime = (run_dir / "checkpoints" / "slot_000.json").stat().st_mtime_ns
    other = cli(tiny_overrides("sm256", mvtec_root) + ["model.net.n_features=50"], run_dir)
    assert_one_line(other, "model.net.n_features 100 -> 50")
    assert (run_dir / "checkpoints" / "slot_000.json").stat().st_mtime_ns == mtime
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config


# -- 2 and 3: a real kill -9, resumed costs; a second process in the same run dir --------------------
def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the job ended early with exit code {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_lock_kill_and_resume(mvtec_root, tmp_path):
    run_dir = tmp_path / "D"
    # FastFlow on ENS4: four slots of 60 steps; the job is stopped as soon as slot 1 is saved.
    args = tiny_overrides("ens4", mvtec_root) + ["model=fastflow", "model.max_steps=60", "logger=wandb", "progress=true"]
    log = (tmp_path / "holder.log").open("w")  # a file, not a pipe: a full pipe would block the job
    holder = subprocess.Popen(command(args, run_dir), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "slot_000.json").exists(), holder)
        os.kill(holder.pid, signal.SIGSTOP)  # it holds the lock while the others try
        same = cli(args, run_dir)
        assert_one_line(same, f"{run_dir} is in use by pid {holder.pid}")
        other = cli(tiny_overrides("ens4", mvtec_root) + ["model=patchcore", "logger=none"], run_dir)
        assert_one_line(other, f"is in use by pid {holder.pid}")
        assert "name: fastflow" in (run_dir / ".hydra" / "config.yaml").read_text()
        os.kill(holder.pid, signal.SIGKILL)  # kill -9 mid-run
    finally:
        holder.kill()
        holder.wait()
        log.close()
    done = [p for p in sorted((run_dir / "checkpoints").glob("slot_*.json"))]
    assert 1 <= len(done) < 4 and not (run_dir / "results.json").exists()

    resumed = cli(args, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").glob("slot_*.json"))]
    assert len(records) == 4
    assert results["resumed_slots"] == len(done)
    # Costs cover every slot, also those trained by the killed process.
    assert results["train_seconds"] == pytest.approx(sum(r["seconds"] for r in records), abs=1e-3)
    assert results["train_peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in records) > 0
    assert results["checkpoint_bytes"] == sum(p.stat().st_size for p in (run_dir / "checkpoints").glob("slot_*.pt"))
    assert all(len(r["losses"]) == 60 for r in records)  # one loss per step
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    assert "name: fastflow" in (run_dir / ".hydra" / "config.yaml").read_text()
    # Progress: the run dir is the first thing said; bars over slots and steps, with the loss.
    assert f"run dir: {run_dir}" in resumed.stdout.splitlines()[0]
    assert "slots:" in resumed.stdout and "slot 3/4" in resumed.stdout and "train_loss" in resumed.stdout
    # W&B: per-slot curves (the killed process' slots too), costs and results.
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    record = read_offline_run(runs[-1])
    for slot in range(4):
        assert record["summary"][f"slot_{slot:03d}/train_loss"] == pytest.approx(records[slot]["losses"][-1])
        assert record["summary"][f"slot_{slot:03d}/seconds"] == pytest.approx(records[slot]["seconds"])
    assert record["summary"]["resumed_slots"] == len(done)
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
def test_validation_names_the_key(compose_cfg, mvtec_root, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        validate(compose_cfg(tiny_overrides("sm256", mvtec_root) + [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_shipped_option_validates(compose_cfg):
    from tiled_hydra.config import group_options

    for group in ("model", "dataset", "backbone", "merge", "logger", "setup"):
        for option in group_options(group):
            setup = [] if group == "setup" else ["+setup=ens9"]
            prefix = "+" if group == "setup" else ""
            validate(compose_cfg(setup + [f"{prefix}{group}={option}"]))
    validate(compose_cfg(["+setup=ens9", "experiment=paper"]))


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["model=nope"], "model=nope: no such option"),
    (["+setup=ens99"], "+setup=ens99: no such option"),
    (["setup.tile_size=abc"], "setup.tile_size='abc'"),
    (["+trainer.max_epochs=2"], "trainer.max_epochs"),
    (["model.net.nonsense=1"], "nonsense"),  # Hydra's own composition error, as one line
    # Validation comes before data: the broken dataset path is never reached.
    (["merge.score=median", "dataset.root=/does/not/exist"], "merge.score='median'"),
])
def test_cli_errors_are_one_line(mvtec_root, tmp_path, extra, message):
    base = [o for o in tiny_overrides("sm256", mvtec_root) if not o.startswith("+setup")]
    setup = [] if any(e.startswith("+setup") for e in extra) else ["+setup=sm256"]
    proc = cli(setup + base + extra, tmp_path / "run")
    assert_one_line(proc, message)
    assert "HYDRA_FULL_ERROR" not in proc.stderr and not (tmp_path / "run" / "results.json").exists()


def test_help_says_setup_is_required_and_hides_internal_groups():
    proc = cli(["--help"], None)
    assert proc.returncode == 0
    assert "+setup= is required: ens4, ens9, sm256, sm512, st4, st9" in proc.stdout
    assert "model=" in proc.stdout and "[padim]" in proc.stdout and "+sweep=" in proc.stdout
    assert "_job_dirs" not in proc.stdout


def test_damaged_checkpoints_are_moved_aside_and_retrained(compose_cfg, mvtec_root, tmp_path, caplog):
    cfg = compose_cfg(tiny_overrides("ens4", mvtec_root) + ["speed.enabled=false"])
    reference = run(cfg, tmp_path)
    ckpt = tmp_path / "checkpoints"
    truncated, overwritten = ckpt / "slot_001.pt", ckpt / "slot_002.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    data = bytearray(overwritten.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # same size, other bytes (NaN weights)
    overwritten.write_bytes(bytes(data))
    again = run(cfg, tmp_path)
    assert again["resumed_slots"] == 2
    for name in ("slot_001.pt", "slot_002.pt"):
        assert f"{name} is damaged" in caplog.text
        assert (ckpt / f"{name}.damaged").exists()
    for key in ("image_AUROC", "pixel_AUPRO"):
        assert again[key] == pytest.approx(reference[key], abs=1e-6)


def test_unreadable_checkpoint_is_one_line_naming_the_file(compose_cfg, mvtec_root, tmp_path):
    from tiled_hydra.models.backbone import build_backbone
    from tiled_hydra.slots.trainer import SlotRunner
    from tiled_hydra.pipeline import make_grid

    cfg = compose_cfg(tiny_overrides("sm256", mvtec_root))
    backbone = build_backbone(**{k: v for k, v in cfg.backbone.items()}, layers=list(cfg.model.net.layers))
    runner = SlotRunner(cfg, make_grid(cfg.setup), backbone, torch.device("cpu"), tmp_path, {})
    runner.checkpoint_path(0).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError) as err:
        runner.load(0)
    assert str(runner.checkpoint_path(0)) in str(err.value) and "delete it to retrain that slot" in str(err.value)


def test_temporary_names_are_unique(tmp_path):
    target = tmp_path / "slot_000.pt"
    names = {temp_path(target) for _ in range(20)}
    assert len(names) == 20 and all(n.parent == tmp_path for n in names)


# -- 6: checkpoint size ----------------------------------------------------------------------------
def test_padim_checkpoint_stores_the_triangle_exactly(compose_cfg, mvtec_root, tmp_path):
    cfg = compose_cfg(tiny_overrides("sm256", mvtec_root) + ["speed.enabled=false"])
    results = run(cfg, tmp_path)
    from tiled_hydra.models.backbone import build_backbone
    from tiled_hydra.slots.trainer import SlotRunner
    from tiled_hydra.pipeline import make_grid

    backbone = build_backbone(**{k: v for k, v in cfg.backbone.items()}, layers=list(cfg.model.net.layers))
    runner = SlotRunner(cfg, make_grid(cfg.setup), backbone, torch.device("cpu"), tmp_path / "checkpoints", {})
    model = runner.load(0)
    from tiled_hydra.models.padim.torch_model import join_row_blocks

    whitening = join_row_blocks(model.model.whitening_blocks)  # (P, D, D), lower-triangular
    p, d, _ = whitening.shape
    state = torch.load(runner.checkpoint_path(0), weights_only=True)["state"]
    assert "model.whitening" not in state and state["model.whitening_tril"].shape == (p, d * (d + 1) // 2)
    assert torch.equal(whitening, whitening.tril())  # nothing above the diagonal was lost
    # Size: the triangle (D(D+1)/2 of D^2 floats) plus the small rest; float32 as computed.
    triangle_bytes = p * d * (d + 1) // 2 * 4
    assert triangle_bytes < results["checkpoint_bytes"] < triangle_bytes * 1.1
    assert state["model.whitening_tril"].dtype == torch.float32


def test_hydra_flags_still_reach_hydra():
    proc = cli(["+setup=sm256", "seed=3", "--cfg", "job", "-p", "seed"], None)
    assert proc.returncode == 0 and proc.stdout.strip() == "3", proc.stderr
