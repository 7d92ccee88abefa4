"""Slot shards: one run's slots trained by several processes into one checkpoint directory, then
evaluated once; ``ensemble.workers``: one command, its slots in W local processes. Real processes
where they are the point (Hydra's joblib launcher, kill -9, workers); the sharded result must equal
the sequential one (the cached run of the same configuration)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import ENV, REPO, assert_one_line, wait_for
from tiled_hydra.config import validate
from tiled_hydra.errors import ConfigError
from tiled_hydra.slots.store import SlotLock, busy_seconds, shard_slots, training_summary

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_AUPRO_05", "pixel_AP", "image_F1", "pixel_F1")


def records(directory: Path) -> dict[int, dict]:
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in sorted(directory.glob("slot_*.json"))}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# -- which slots a shard trains; what the records add up to --------------------------------------------
@pytest.mark.parametrize("num_slots,num_shards", [(9, 2), (9, 4), (4, 4), (1, 1), (4, 9)])
def test_shards_partition_the_slots(num_slots, num_shards):
    parts = [shard_slots(num_slots, k, num_shards) for k in range(num_shards)]
    assert sorted(s for part in parts for s in part) == list(range(num_slots))  # each slot exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert shard_slots(num_slots, None, num_shards) == list(range(num_slots))


def test_wall_time_spans_every_shard():
    # Two shards of two slots each, overlapping in time: the sum counts each slot, the wall time
    # runs from the first start (100) to the last end (112), where some slot was always training.
    rows = [{"seconds": 5, "started": 100, "finished": 105, "shard": 0}, {"seconds": 6, "started": 105, "finished": 111, "shard": 0},
            {"seconds": 4, "started": 101, "finished": 105, "shard": 1}, {"seconds": 7, "started": 105, "finished": 112, "shard": 1}]
    rows = [r | {"peak_mem_bytes": 10 * (i + 1), "checkpoint_bytes": 100 + i} for i, r in enumerate(rows)]
    summary = training_summary(rows)
    assert summary["train_seconds"] == 22 and summary["train_wall_seconds"] == 12
    assert summary["train_peak_mem_bytes"] == 40 and summary["train_shards"] == 2
    assert summary["checkpoint_bytes"] == 406 and summary["checkpoint_bytes_per_slot"] == 103


def test_wall_time_leaves_out_the_pause_between_a_kill_and_a_resume():
    # [0, 10] and [5, 12] overlap (12 s busy), then nothing until the resume trains [20, 25]: 17 s, not 25.
    assert busy_seconds([(20, 25), (0, 10), (5, 12)]) == 17
    assert busy_seconds([(0, 10), (2, 3)]) == 10  # one interval inside another
    assert busy_seconds([(0, 1), (1, 2)]) == 2  # touching
    assert busy_seconds([]) == 0
    rows = [{"seconds": s, "started": a, "finished": b, "peak_mem_bytes": 1, "checkpoint_bytes": 1, "resumed": r}
            for s, a, b, r in ((10, 0, 10, True), (7, 5, 12, True), (5, 20, 25, False))]
    summary = training_summary(rows)
    assert summary["train_wall_seconds"] == 17 and summary["train_seconds"] == 22 and summary["resumed_slots"] == 2
    # records of older versions carry no times: no wall time rather than a wrong one
    assert training_summary([{k: v for k, v in r.items() if k not in ("started", "finished")} for r in rows])[
        "train_wall_seconds"] is None


@pytest.mark.parametrize("override,needle", [
    ("ensemble.shard=2", "ensemble.shard=2: expected null or an integer in [0, 2)"),
    ("ensemble.shard=-1", "ensemble.shard=-1"),
    ("ensemble.shard=one", "ensemble.shard='one'"),
    ("ensemble.num_shards=0", "ensemble.num_shards=0: expected an integer >= 1"),
    ("ensemble.stage=fit", "ensemble.stage='fit': expected one of all, train, evaluate"),
])
def test_bad_shard_settings_are_one_line_errors(compose_cfg, tiny, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(tiny.canonical("ens4") + ["ensemble.num_shards=2", override]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_shard_cannot_evaluate(compose_cfg, tiny):
    cfg = compose_cfg(tiny.canonical("ens4") + ["ensemble.num_shards=2", "ensemble.shard=0", "ensemble.stage=evaluate"])
    with pytest.raises(ConfigError, match="a shard only trains"):
        validate(cfg)


# -- two processes through Hydra's joblib launcher, then one evaluation ------------------------------
@pytest.mark.slow
def test_two_joblib_shards_equal_the_sequential_run(main_cli, trained_run, tiny, tmp_path):
    shared = tmp_path / "slots"
    base = tiny.canonical("ens4")
    # The sweep's jobs run in joblib's worker processes (started here, and kept for the next joblib sweep).
    sweep = main_cli(["-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", *base, "ensemble.num_shards=2",
                      "ensemble.shard=range(2)", f"ensemble.checkpoint_dir={shared}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert sweep.code == 0, sweep.err[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in sweep.out and "launching 2 jobs" in sweep.out
    assert "slot_000 trained" in "".join(p.read_text() for p in (tmp_path / "sweep").rglob("tiled_hydra.log"))
    slots = records(shared)
    assert sorted(slots) == [0, 1, 2, 3]
    assert {k: r["shard"] for k, r in slots.items()} == {0: 0, 1: 1, 2: 0, 3: 1}
    assert len({slots[0]["pid"], slots[1]["pid"]}) == 2, "the shards ran in two processes"
    shard_files = sorted((tmp_path / "sweep").rglob("shard.json"))
    assert len(shard_files) == 2 and not list((tmp_path / "sweep").rglob("results.json")), sweep.stdout[-2000:]
    assert [json.loads(p.read_text())["slots"] for p in shard_files] in ([[0, 2], [1, 3]], [[1, 3], [0, 2]])

    evaluated = tmp_path / "evaluate"
    ran = main_cli([*base, f"ensemble.checkpoint_dir={shared}", "ensemble.stage=evaluate"], evaluated)
    assert ran.code == 0, ran.err[-3000:]
    assert not (evaluated / "checkpoints").exists() or not list((evaluated / "checkpoints").glob("slot_*"))
    parallel, reference = results(evaluated), trained_run("padim", "ens4").results
    for key in METRICS:  # PaDiM: the same statistics, so exactly the same numbers
        assert parallel[key] == reference[key], key
    assert parallel["fingerprint"] == reference["fingerprint"]
    assert parallel["resumed_slots"] == 4 and parallel["train_shards"] == 2
    assert parallel["train_seconds"] == pytest.approx(sum(r["seconds"] for r in slots.values()), abs=1e-3)
    assert parallel["train_peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in slots.values())
    intervals = [(r["started"], r["finished"]) for r in slots.values()]
    assert parallel["train_wall_seconds"] == pytest.approx(busy_seconds(intervals), abs=1e-2)

    # Other evaluation settings reuse the trained slots in a new run dir, never in the same one.
    again = [*base, "metrics.resolution=setup", f"ensemble.checkpoint_dir={shared}", "ensemble.stage=evaluate"]
    refused = main_cli(again, evaluated)
    assert_one_line(refused.code, refused.err, "belongs to another configuration (metrics.resolution", expected_code=2)
    ran = main_cli(again, tmp_path / "evaluate_setup_resolution")
    assert ran.code == 0, ran.err[-3000:]
    other = results(tmp_path / "evaluate_setup_resolution")
    assert other["slot_fingerprint"] == parallel["slot_fingerprint"] and other["fingerprint"] != parallel["fingerprint"]
    assert other["resumed_slots"] == 4


@pytest.mark.slow
def test_evaluation_refuses_missing_slots_and_a_killed_shard_resumes(main_cli, trained_run, tiny, tmp_path):
    """FastFlow (trainable, deterministic on one thread): shard 1 trains here; evaluation names the
    missing slots; shard 0 in its own process is killed -9 after its first slot; re-running it
    finishes it; the evaluated metrics equal the uninterrupted sequential run's to 1e-6."""
    shared = tmp_path / "slots"
    base = [*tiny.canonical("ens4", "fastflow"), "ensemble.num_shards=2", f"ensemble.checkpoint_dir={shared}"]
    assert main_cli([*base, "ensemble.shard=1"], tmp_path / "shard1").code == 0
    assert sorted(records(shared)) == [1, 3]

    evaluate = [*base, "ensemble.stage=evaluate"]
    refused = main_cli(evaluate, tmp_path / "evaluate")
    assert_one_line(refused.code, refused.err, "slots 0, 2 (2 of 4) are not trained", str(shared), "ensemble.stage=train",
                    expected_code=2)
    assert not (tmp_path / "evaluate" / "results.json").exists()

    shard0 = [*base, "ensemble.shard=0"]
    log = (tmp_path / "shard0.log").open("w")
    killed = subprocess.Popen([sys.executable, "-m", "tiled_hydra", *shard0, f"hydra.run.dir={tmp_path / 'shard0'}"],
                              cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (shared / "slot_000.json").exists(), killed)
        os.kill(killed.pid, signal.SIGSTOP)
        assert not (shared / "slot_002.json").exists(), "slot 2 finished before the kill: raise model.max_steps"
        os.kill(killed.pid, signal.SIGKILL)  # kill -9 midway through the shard
    finally:
        killed.kill()
        killed.wait()
        log.close()
    assert not (tmp_path / "shard0" / "shard.json").exists()

    assert main_cli(shard0, tmp_path / "shard0").code == 0
    summary = json.loads((tmp_path / "shard0" / "shard.json").read_text())
    assert summary["slots"] == [0, 2] and summary["resumed_slots"] == 1 and summary["missing_slots"] == []
    ran = main_cli(evaluate, tmp_path / "evaluate")
    assert ran.code == 0, ran.err[-3000:]
    parallel, reference = results(tmp_path / "evaluate"), trained_run("fastflow", "ens4").results
    for key in METRICS:
        assert parallel[key] == pytest.approx(reference[key], abs=1e-6), key
    assert parallel["train_shards"] == 2 and reference["train_shards"] == 1


def test_shards_in_a_multirun_need_a_shared_checkpoint_dir(main_cli, tiny, tmp_path):
    ran = main_cli(["-m", *tiny.canonical("ens4"), "ensemble.num_shards=2", "ensemble.shard=range(2)",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert_one_line(ran.code, ran.err, "set ensemble.checkpoint_dir=DIR", expected_code=2)


def test_a_shared_dir_of_another_configuration_is_refused(main_cli, tiny, tmp_path):
    shared = tmp_path / "slots"
    shard = ["ensemble.num_shards=4", f"ensemble.checkpoint_dir={shared}"]
    assert main_cli([*tiny.canonical("ens4"), *shard, "ensemble.shard=3"], tmp_path / "a").code == 0
    other = main_cli([*tiny.canonical("ens4", "patchcore"), *shard, "ensemble.shard=0"], tmp_path / "b")
    assert_one_line(other.code, other.err, "belongs to another configuration (model.",
                    f"use another ensemble.checkpoint_dir or delete {shared}", expected_code=2)
    assert sorted(records(shared)) == [3]


# -- other launchers --------------------------------------------------------------------------------
def test_slurm_shards_render_one_gpu_per_shard(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="pip install -e '.[slurm]'")
    from tests.test_sweeps import sbatch_script

    cfg = compose_cfg(["+setup=ens9", "model=fastflow", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                       "ensemble.num_shards=9", "ensemble.shard=4", f"ensemble.checkpoint_dir={tmp_path / 'slots'}",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    validate(cfg)
    script = sbatch_script(cfg, tmp_path, monkeypatch)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu"):
        assert line in script, line
    assert shard_slots(9, int(cfg.ensemble.shard), int(cfg.ensemble.num_shards)) == [4]  # one slot per GPU


def test_a_slot_being_trained_elsewhere_is_waited_for(tmp_path, caplog):
    """flock conflicts between two open files even in one process: the second SlotLock waits
    (and says so) until the first is released, so two shards never train one slot at once."""
    path = tmp_path / "slot_003.lock"
    entered = threading.Event()

    def second() -> None:
        with SlotLock(path):
            entered.set()

    with caplog.at_level("INFO", logger="tiled_hydra"):
        with SlotLock(path):
            assert path.read_text() == str(os.getpid())
            waiter = threading.Thread(target=second)
            waiter.start()
            time.sleep(0.5)
            assert not entered.is_set(), "the second lock did not wait"
        waiter.join(timeout=10)
    assert entered.is_set()
    assert any("another process" in r.getMessage() and "slot_003.pt" in r.getMessage() for r in caplog.records)


# -- ensemble.workers: one command, its slots in W local processes ---------------------------------------
@pytest.mark.parametrize("override,needle", [
    ("ensemble.workers=0", "ensemble.workers=0: expected an integer >= 1"),
    ("ensemble.workers=two", "ensemble.workers='two'"),
])
def test_bad_workers_are_one_line_errors(compose_cfg, tiny, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(tiny.canonical("ens4") + [override]))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_workers_are_refused_in_a_shard_job(compose_cfg, tiny):
    cfg = compose_cfg(tiny.canonical("ens4") + ["ensemble.workers=2", "ensemble.num_shards=2", "ensemble.shard=0"])
    with pytest.raises(ConfigError, match="takes ensemble.workers=1"):
        validate(cfg)


def test_worker_command_keeps_the_run_settings_and_sets_its_own():
    from tiled_hydra.slots.workers import worker_overrides

    got = worker_overrides(["+setup=ens9", "model=efficient_ad", "model.max_steps=3", "ensemble.workers=2", "logger=wandb",
                            "hydra.run.dir=/x", "~ensemble.stage"], 1, 2, Path("/ck"), Path("/x/.workers/shard_1"))
    assert got[:3] == ["+setup=ens9", "model=efficient_ad", "model.max_steps=3"]
    assert got[3:] == ["ensemble.shard=1", "ensemble.num_shards=2", "ensemble.workers=1", "ensemble.checkpoint_dir=/ck",
                       "hydra.run.dir=/x/.workers/shard_1", "logger=none", "progress=false"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_the_command_kills_its_worker_and_a_rerun_equals_the_sequential_run(main_cli, trained_run, tiny, tmp_path):
    """The command (its own process) starts a worker for shard 1 and is killed -9: the worker dies
    with it. The same command again (here, in this process, with a new worker) trains what is
    missing, in two processes, to exactly the sequential run's numbers (PaDiM: the same statistics)."""
    run_dir = tmp_path / "run"
    args = [*tiny.canonical("ens4"), "ensemble.workers=2"]
    worker_lock = run_dir / ".workers" / "shard_1" / ".lock"
    log = (tmp_path / "run.log").open("w")
    parent = subprocess.Popen([sys.executable, "-m", "tiled_hydra", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=ENV,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: worker_lock.exists() and worker_lock.read_text().strip().isdigit(), parent)
        worker = int(worker_lock.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30  # the kernel sends the worker SIGTERM when its parent dies
        while alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the killed command"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
        log.close()
    assert not (run_dir / "results.json").exists()
    # What the command wrote (stdout and stderr, no terminal): no progress bars (progress=auto), and none
    # of the warnings Lightning gives for every slot (the trainer filters them)
    output = (tmp_path / "run.log").read_text()
    assert "slot_000 trained" in output and "slots:" not in output
    assert "configure_optimizers" not in output and "eval mode" not in output and "Warning" not in output
    before = records(run_dir / "checkpoints")

    ran = main_cli(args, run_dir)
    assert ran.code == 0, ran.err[-3000:]
    slots = records(run_dir / "checkpoints")
    assert sorted(slots) == [0, 1, 2, 3]
    assert {k: r["shard"] for k, r in slots.items()} == {0: 0, 1: 1, 2: 0, 3: 1}
    trained_now = {k: r for k, r in slots.items() if k not in before}
    assert {r["pid"] for r in trained_now.values() if r["shard"] == 0} <= {os.getpid()}
    assert all(r["pid"] not in (os.getpid(), parent.pid) for r in trained_now.values() if r["shard"] == 1), \
        "shard 1's slots were trained by the worker"
    assert (run_dir / ".workers" / "shard_1" / "shard.json").is_file(), ran.out[-2000:]
    parallel, reference = results(run_dir), trained_run("padim", "ens4").results
    for key in METRICS:
        assert parallel[key] == reference[key], key
    assert parallel["fingerprint"] == reference["fingerprint"]
    assert parallel["resumed_slots"] == len(before) and parallel["train_shards"] == 2
    # Run again (one process: ensemble.workers changes no result): everything is resumed.
    assert main_cli([*tiny.canonical("ens4"), "skip_completed=false"], run_dir).code == 0
    assert results(run_dir)["resumed_slots"] == 4


@pytest.mark.slow
def test_a_failing_worker_fails_the_run(main_cli, tiny, tmp_path):
    # The worker's own run dir is taken (a live lock held by this test): the worker exits 2, the run fails (1).
    from tiled_hydra.rundir import RunDirLock

    run_dir = tmp_path / "run"
    with RunDirLock(run_dir / ".workers" / "shard_1"):
        ran = main_cli([*tiny.canonical("ens4"), "ensemble.workers=2"], run_dir)
    assert_one_line(ran.code, ran.err, "worker for shard 1 exited with code 2", "is in use by pid", expected_code=1)
    assert not (run_dir / "results.json").exists()

