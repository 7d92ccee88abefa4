"""Slot shards (issue 14): one run's slots trained by several processes into one checkpoint
directory, then evaluated once.  Real processes through Hydra's joblib launcher, real kill -9,
tiny data; the sharded result must equal the sequential one."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.test_rundir import ENV, assert_one_line, wait_for
from tests.test_run import REPO, tiny_overrides, write_mvtec
from tests.test_sweeps import sbatch_script
from tiled_hydra.slots.trainer import shard_slots, summarize
from tiled_hydra.errors import ConfigError
from tiled_hydra.config import validate

METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_AUPRO_05", "pixel_AP", "image_F1", "pixel_F1")


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return write_mvtec(tmp_path_factory.mktemp("mvtec"))


def tiny(root: Path, *extra: str) -> list[str]:
    return tiny_overrides("ens4", root) + ["speed.enabled=false", "report.overlays=0", *extra]


def python_m(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiled_hydra", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900, **kwargs)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(directory: Path) -> dict[int, dict]:
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in sorted(directory.glob("slot_*.json"))}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# -- which slots a shard trains ----------------------------------------------------------------------
@pytest.mark.parametrize("num_slots,num_shards", [(9, 2), (9, 4), (4, 4), (1, 1), (4, 9)])
def test_shards_partition_the_slots(num_slots, num_shards):
    parts = [shard_slots(num_slots, k, num_shards) for k in range(num_shards)]
    assert sorted(s for part in parts for s in part) == list(range(num_slots))  # each slot exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert shard_slots(num_slots, None, num_shards) == list(range(num_slots))


def test_wall_time_spans_every_shard():
    # Two shards of two slots each, overlapping in time: the sum counts each slot, the wall time
    # runs from the first start (100) to the last end (112).
    rows = [{"seconds": 5, "started": 100, "finished": 105, "shard": 0}, {"seconds": 6, "started": 105, "finished": 111, "shard": 0},
            {"seconds": 4, "started": 101, "finished": 105, "shard": 1}, {"seconds": 7, "started": 105, "finished": 112, "shard": 1}]
    rows = [r | {"peak_mem_bytes": 10 * (i + 1), "checkpoint_bytes": 1} for i, r in enumerate(rows)]
    summary = summarize(rows)
    assert summary["train_seconds"] == 22 and summary["train_wall_seconds"] == 12
    assert summary["train_peak_mem_bytes"] == 40 and summary["train_shards"] == 2


@pytest.mark.parametrize("override,needle", [
    ("ensemble.shard=2", "ensemble.shard=2: expected null or an integer in [0, 2)"),
    ("ensemble.shard=-1", "ensemble.shard=-1"),
    ("ensemble.shard=one", "ensemble.shard='one'"),
    ("ensemble.num_shards=0", "ensemble.num_shards=0: expected an integer >= 1"),
    ("ensemble.stage=fit", "ensemble.stage='fit': expected one of all, train, evaluate"),
])
def test_bad_shard_settings_are_one_line_errors(compose_cfg, mvtec_root, override, needle):
    cfg = compose_cfg(tiny(mvtec_root, "ensemble.num_shards=2", override))
    with pytest.raises(ConfigError, match=None) as err:
        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_shard_cannot_evaluate(compose_cfg, mvtec_root):
    cfg = compose_cfg(tiny(mvtec_root, "ensemble.num_shards=2", "ensemble.shard=0", "ensemble.stage=evaluate"))
    with pytest.raises(ConfigError, match="a shard only trains"):
        validate(cfg)


# -- two processes through Hydra's joblib launcher, then one evaluation ------------------------------
@pytest.mark.slow
def test_two_joblib_shards_equal_the_sequential_run(mvtec_root, tmp_path):
    shared = tmp_path / "slots"
    sweep = ok(python_m(["-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", *tiny(mvtec_root),
                         "ensemble.num_shards=2", "ensemble.shard=range(2)", f"ensemble.checkpoint_dir={shared}",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}"]))
    slots = records(shared)
    assert sorted(slots) == [0, 1, 2, 3]
    assert {k: r["shard"] for k, r in slots.items()} == {0: 0, 1: 1, 2: 0, 3: 1}
    assert len({slots[0]["pid"], slots[1]["pid"]}) == 2, "the shards ran in two processes"
    shard_files = sorted((tmp_path / "sweep").rglob("shard.json"))
    assert len(shard_files) == 2 and not list((tmp_path / "sweep").rglob("results.json")), sweep.stdout[-2000:]
    assert [json.loads(p.read_text())["slots"] for p in shard_files] in ([[0, 2], [1, 3]], [[1, 3], [0, 2]])

    evaluated = tmp_path / "evaluate"
    ok(python_m([*tiny(mvtec_root), f"ensemble.checkpoint_dir={shared}", "ensemble.stage=evaluate",
                 f"hydra.run.dir={evaluated}"]))
    assert not (evaluated / "checkpoints").exists() or not list((evaluated / "checkpoints").glob("slot_*"))
    sequential = tmp_path / "sequential"
    ok(python_m([*tiny(mvtec_root), f"hydra.run.dir={sequential}"]))
    parallel, reference = results(evaluated), results(sequential)
    for key in METRICS:  # PaDiM: the same statistics, so exactly the same numbers
        assert parallel[key] == reference[key], key
    assert parallel["fingerprint"] == reference["fingerprint"]
    assert parallel["resumed_slots"] == 4 and parallel["train_shards"] == 2
    assert parallel["train_seconds"] == pytest.approx(sum(r["seconds"] for r in slots.values()), abs=1e-3)
    assert parallel["train_peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in slots.values())
    first = min(r["started"] for r in slots.values())
    last = max(r["finished"] for r in slots.values())
    assert parallel["train_wall_seconds"] == pytest.approx(last - first, abs=1e-2)

    # Other evaluation settings reuse the trained slots in a new run dir, never in the same one.
    again = [*tiny(mvtec_root), "metrics.resolution=setup", f"ensemble.checkpoint_dir={shared}", "ensemble.stage=evaluate"]
    assert_one_line(python_m([*again, f"hydra.run.dir={evaluated}"]), "belongs to another configuration (metrics.resolution")
    ok(python_m([*again, f"hydra.run.dir={tmp_path / 'evaluate_setup_resolution'}"]))
    other = results(tmp_path / "evaluate_setup_resolution")
    assert other["slot_fingerprint"] == parallel["slot_fingerprint"] and other["fingerprint"] != parallel["fingerprint"]
    assert other["resumed_slots"] == 4


@pytest.mark.slow
def test_evaluation_refuses_missing_slots_and_a_killed_shard_resumes(mvtec_root, tmp_path):
    """FastFlow (trainable, deterministic on one thread): shard 0 is killed -9 after its first slot;
    evaluation names the missing slots; re-running the shard finishes it; the evaluated metrics
    equal a sequential run's to 1e-6."""
    shared = tmp_path / "slots"
    base = tiny(mvtec_root, "model=fastflow", "model.max_steps=40", "ensemble.num_shards=2", f"ensemble.checkpoint_dir={shared}")
    ok(python_m([*base, "ensemble.shard=1", f"hydra.run.dir={tmp_path / 'shard1'}"]))
    assert sorted(records(shared)) == [1, 3]

    evaluate = [*base, "ensemble.stage=evaluate", f"hydra.run.dir={tmp_path / 'evaluate'}"]
    refused = python_m(evaluate)
    assert_one_line(refused, "slots 0, 2 (2 of 4) are not trained", str(shared), "ensemble.stage=train")
    assert not (tmp_path / "evaluate" / "results.json").exists()

    command = [sys.executable, "-m", "tiled_hydra", *base, "ensemble.shard=0", f"hydra.run.dir={tmp_path / 'shard0'}"]
    log = (tmp_path / "shard0.log").open("w")
    killed = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
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

    ok(python_m(command[3:]))
    shard0 = json.loads((tmp_path / "shard0" / "shard.json").read_text())
    assert shard0["slots"] == [0, 2] and shard0["resumed_slots"] == 1 and shard0["missing_slots"] == []
    ok(python_m(evaluate))
    sequential = tmp_path / "sequential"
    ok(python_m([*tiny(mvtec_root, "model=fastflow", "model.max_steps=40"), f"hydra.run.dir={sequential}"]))
    parallel, reference = results(tmp_path / "evaluate"), results(sequential)
    for key in METRICS:
        assert parallel[key] == pytest.approx(reference[key], abs=1e-6), key
    assert parallel["train_shards"] == 2 and reference["train_shards"] == 1


def test_shards_in_a_multirun_need_a_shared_checkpoint_dir(mvtec_root, tmp_path):
    proc = python_m(["-m", *tiny(mvtec_root), "ensemble.num_shards=2", "ensemble.shard=range(2)",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert proc.returncode != 0
    assert "set ensemble.checkpoint_dir=DIR" in proc.stderr, proc.stderr[-2000:]


def test_a_shared_dir_of_another_configuration_is_refused(mvtec_root, tmp_path):
    shared = tmp_path / "slots"
    ok(python_m([*tiny(mvtec_root, "ensemble.num_shards=4", "ensemble.shard=3", f"ensemble.checkpoint_dir={shared}"),
                 f"hydra.run.dir={tmp_path / 'a'}"]))
    other = python_m([*tiny(mvtec_root, "model=patchcore", "ensemble.num_shards=4", "ensemble.shard=0",
                            f"ensemble.checkpoint_dir={shared}"), f"hydra.run.dir={tmp_path / 'b'}"])
    assert_one_line(other, "belongs to another configuration (model.", f"use another ensemble.checkpoint_dir or delete {shared}")
    assert sorted(records(shared)) == [3]


# -- other launchers --------------------------------------------------------------------------------
def test_slurm_shards_render_one_gpu_per_shard(compose_cfg, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="pip install -e '.[slurm]'")
    cfg = compose_cfg(["+setup=ens9", "model=fastflow", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu",
                       "ensemble.num_shards=9", "ensemble.shard=4", f"ensemble.checkpoint_dir={tmp_path / 'slots'}",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    validate(cfg)
    script = sbatch_script(cfg, tmp_path, monkeypatch)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu"):
        assert line in script, line
    assert shard_slots(9, int(cfg.ensemble.shard), int(cfg.ensemble.num_shards)) == [4]  # one slot per GPU


def test_ray_runs_two_shards_locally(mvtec_root, tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        pytest.skip("hydra-ray-launcher not installed (pip install -e '.[ray]'): the Ray form is not exercised here")
    shared = tmp_path / "slots"
    ok(python_m(["-m", "hydra/launcher=ray", *tiny(mvtec_root), "ensemble.num_shards=2", "ensemble.shard=range(2)",
                 f"ensemble.checkpoint_dir={shared}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]))
    assert sorted(records(shared)) == [0, 1, 2, 3]


def test_a_slot_being_trained_elsewhere_is_waited_for(tmp_path, caplog):
    """flock conflicts between two open files even in one process: the second SlotLock waits
    (and says so) until the first is released, so two shards never train one slot at once."""
    import threading
    import time

    from tiled_hydra.slots.trainer import SlotLock

    path = tmp_path / "slot_003.lock"
    entered = threading.Event()

    def second() -> None:
        with SlotLock(path):
            entered.set()

    with caplog.at_level("INFO", logger="tiled_hydra.slots.trainer"):
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
def test_bad_workers_are_one_line_errors(compose_cfg, mvtec_root, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(tiny(mvtec_root, override)))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_workers_are_refused_in_a_shard_job(compose_cfg, mvtec_root):
    cfg = compose_cfg(tiny(mvtec_root, "ensemble.workers=2", "ensemble.num_shards=2", "ensemble.shard=0"))
    with pytest.raises(ConfigError, match="takes ensemble.workers=1"):
        validate(cfg)


def test_worker_command_keeps_the_run_settings_and_sets_its_own():
    from tiled_hydra.slots.workers import worker_overrides

    got = worker_overrides(["+setup=ens9", "model=efficient_ad", "model.max_steps=3", "ensemble.workers=2", "logger=wandb",
                            "hydra.run.dir=/x", "~ensemble.stage"], 1, 2, Path("/ck"), Path("/x/.workers/shard_1"))
    assert got[:3] == ["+setup=ens9", "model=efficient_ad", "model.max_steps=3"]
    assert got[3:] == ["ensemble.shard=1", "ensemble.num_shards=2", "ensemble.workers=1", "ensemble.checkpoint_dir=/ck",
                       "hydra.run.dir=/x/.workers/shard_1", "logger=none", "progress=false"]


@pytest.mark.slow
def test_two_workers_equal_the_sequential_run(mvtec_root, tmp_path):
    run_dir, sequential = tmp_path / "workers", tmp_path / "sequential"
    proc = ok(python_m([*tiny(mvtec_root), "ensemble.workers=2", f"hydra.run.dir={run_dir}"]))
    slots = records(run_dir / "checkpoints")
    assert sorted(slots) == [0, 1, 2, 3]
    worker_pids = {r["pid"] for k, r in slots.items() if r["shard"] == 1}
    assert len({r["pid"] for r in slots.values()}) == 2 and worker_pids, "shard 1's slots were trained by the worker"
    assert (run_dir / ".workers" / "shard_1" / "shard.json").is_file(), proc.stdout[-2000:]
    ok(python_m([*tiny(mvtec_root), f"hydra.run.dir={sequential}"]))
    parallel, reference = results(run_dir), results(sequential)
    for key in METRICS:  # PaDiM: the same statistics, so exactly the same numbers
        assert parallel[key] == reference[key], key
    assert parallel["fingerprint"] == reference["fingerprint"]
    assert parallel["resumed_slots"] == 0 and parallel["train_shards"] == 2  # trained by this command, in two processes
    # Run again: everything is resumed, no worker needed to train anything.
    ok(python_m([*tiny(mvtec_root), "ensemble.workers=2", f"hydra.run.dir={run_dir}", "skip_completed=false"]))
    assert results(run_dir)["resumed_slots"] == 4


@pytest.mark.slow
def test_a_failing_worker_fails_the_run(mvtec_root, tmp_path):
    # The worker's own run dir is taken (a live lock by this test process): the worker exits 1, so does the run.
    from tiled_hydra.rundir import RunDirLock

    run_dir = tmp_path / "run"
    with RunDirLock(run_dir / ".workers" / "shard_1"):
        proc = python_m([*tiny(mvtec_root), "ensemble.workers=2", f"hydra.run.dir={run_dir}"])
    assert_one_line(proc, "worker for shard 1 exited with code 1")
    assert not (run_dir / "results.json").exists()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_the_command_kills_its_workers_and_a_rerun_resumes(mvtec_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny(mvtec_root, "model=fastflow", "model.max_steps=40"), "ensemble.workers=2", f"hydra.run.dir={run_dir}"]
    worker_lock = run_dir / ".workers" / "shard_1" / ".lock"
    log = (tmp_path / "run.log").open("w")
    parent = subprocess.Popen([sys.executable, "-m", "tiled_hydra", *args], cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: worker_lock.exists() and worker_lock.read_text().strip().isdigit(), parent)
        worker = int(worker_lock.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 30  # the kernel sends the worker SIGTERM when its parent dies
        while alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the killed command"
            time.sleep(0.2)
    finally:
        parent.kill()
        parent.wait()
        log.close()
    assert not (run_dir / "results.json").exists()
    done = ok(python_m(args))
    assert results(run_dir)["num_models"] == 4, done.stdout[-1000:]
