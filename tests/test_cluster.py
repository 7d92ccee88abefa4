"""One run's slot shards on real clusters: a multi-node Ray cluster and a two-node SLURM cluster,
both on this machine (tools/cluster/), a lost Ray node and a preempted SLURM job.

The tests marked ``cluster`` start daemons and train for minutes, so the default ``pytest`` run
leaves them out (``-m "not cluster"`` in pyproject); they run with

    bash tools/cluster/install.sh && python -m pytest -n 0 -m cluster tests/test_cluster.py

and skip when Ray or SLURM is not installed. Every sharded run is evaluated once and compared
with a sequential run of the same configuration: PaDiM's slots are statistics of the same
tiles, so the metrics must be equal to the last digit. The placement and rendering tests at the
end run in the default suite (they need no daemon).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.test_sweeps import sbatch_script
from tiled_hydra.slots.cluster import node_name, visible_devices, worker_devices, worker_env

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools" / "cluster"
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_AUPRO_05", "pixel_AP", "image_F1", "pixel_F1")
# The tiny trained run of every test here: ENS4 (4 slots of 256 px tiles), PaDiM, 6 training images.
TINY = ["model=padim", "+setup=ens4", "dataset.n_train=6", "dataset.n_val=4", "dataset.n_test=6", "logger=none",
        "report.overlays=0"]
SHARDS = ["ensemble.num_shards=2", "ensemble.shard=range(2)"]
# A slot that trains for several seconds: a requeued SLURM job gets SIGTERM (which submitit ignores) and
# SIGKILL KillWait (5 s) later, and TINY's PaDiM slot (0.8 s) would finish in between.
SLOW = [o for o in TINY if o != "model=padim"] + ["model=fastflow", "model.max_steps=60"]
SHARD_SLOTS = {0: [0, 2], 1: [1, 3]}  # slot k belongs to shard k mod 2


def python_m(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiled_hydra", *args], cwd=REPO, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def records(directory: Path) -> dict[int, dict]:
    return {int(p.stem[5:]): json.loads(p.read_text()) for p in sorted(directory.glob("slot_*.json"))}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def free_port(count: int = 1) -> int:
    """A port p with p .. p+count-1 free on the loopback addresses."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + count < 60000 and all(_free(port + k) for k in range(count)):
            return port
    raise RuntimeError("no free port")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
            return True
        except OSError:
            return False


def evaluate_equals_sequential(slots: Path, run_dir: Path, sequential: dict, overrides: list[str] = TINY) -> dict:
    """Evaluate the slots in ``slots`` once; every metric equals the sequential run's."""
    ok(python_m([*overrides, f"ensemble.checkpoint_dir={slots}", "ensemble.stage=evaluate", f"hydra.run.dir={run_dir}"]))
    evaluated = results(run_dir)
    for key in METRICS:
        assert evaluated[key] == sequential[key], key
    assert evaluated["slot_fingerprint"] == sequential["slot_fingerprint"]
    assert evaluated["resumed_slots"] == 4 and evaluated["train_shards"] == 2
    return evaluated


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict:
    """The uninterrupted one-process run every sharded run must equal (also generates the data once)."""
    run_dir = tmp_path_factory.mktemp("sequential") / "run"
    ok(python_m([*TINY, f"hydra.run.dir={run_dir}"]))
    return results(run_dir)


# -- Ray -------------------------------------------------------------------------------------------
def ray_local(*args: str) -> subprocess.CompletedProcess:
    return ok(subprocess.run([sys.executable, str(TOOLS / "ray_local.py"), *args], cwd=REPO, capture_output=True,
                             text=True, timeout=600))


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (127.0.0.2) and a worker node (127.0.0.3), 1 CPU each, each its own raylet."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: pip install -e '.[ray]'")
    state = Path(tempfile.mkdtemp(prefix="thr", dir="/tmp"))  # short: Ray's socket paths live inside
    try:
        ray_local("up", str(state), "--workers", "1", "--cpus", "1", "--port", str(free_port(2)))
        info = json.loads((state / "cluster.json").read_text())
        yield {**info, "state": state, "env": {**ENV, **info["env"]}}
    finally:
        ray_local("down", str(state))
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def two_nodes(ray_cluster):
    """The cluster with its worker node alive (a test before may have killed it)."""
    if raylet("127.0.0.3", ray_cluster["state"]) is None:
        ray_local("add-node", str(ray_cluster["state"]), "127.0.0.3")
    return ray_cluster


def raylet(ip: str, state: Path) -> psutil.Process | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "raylet" and f"--node_ip_address={ip}" in cmdline and any(str(state) in a for a in cmdline):
            return proc
    return None


def ray_shards(out: Path, *extra: str) -> list[str]:
    return ["-m", "hydra/launcher=ray_cluster", "hydra.launcher.remote.num_gpus=0", "hydra.launcher.remote.num_cpus=1",
            *TINY, *SHARDS, f"ensemble.checkpoint_dir={out / 'slots'}", f"hydra.sweep.dir={out / 'sweep'}", *extra]


def ray_jobs(out: Path) -> dict[int, dict]:
    return {row["job"]: row for row in json.loads((out / "sweep" / "ray_jobs.json").read_text())}


@contextmanager
def started(args: list[str], env: dict, log_path: Path):
    """The command running in the background, killed on the way out if it has not ended."""
    with open(log_path, "w") as log:
        command = subprocess.Popen([sys.executable, "-m", "tiled_hydra", *args], cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            yield command
        finally:
            command.kill()
            command.wait()


@contextmanager
def kill_node_during_its_second_slot(cluster: dict, args: list[str], out: Path):
    """Start the sharded command; once the worker node has saved one slot and trains its next one,
    kill -9 the node (its raylet and every process under it). Yields (command, the shard that
    was lost, the pid that trained its finished slot)."""
    state, node = cluster["state"], raylet("127.0.0.3", cluster["state"])
    with started(args, cluster["env"], out.with_suffix(".log")) as command:
        slots, deadline = out / "slots", time.monotonic() + 600
        while True:
            assert command.poll() is None, f"the command ended before the kill: {out.with_suffix('.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the worker node never trained a second slot"
            on_node = {p.pid for p in node.children(recursive=True)}
            for shard, (first, second) in SHARD_SLOTS.items():
                done, lock = slots / f"slot_{first:03d}.json", slots / f"slot_{second:03d}.lock"
                pid = lock.read_text().strip() if lock.exists() else ""
                if done.exists() and pid.isdigit() and int(pid) in on_node and not lock.with_suffix(".json").exists():
                    ray_local("kill-node", str(state), "127.0.0.3")
                    yield command, shard, json.loads(done.read_text())["pid"]
                    return
            time.sleep(0.1)


@pytest.mark.cluster
def test_ray_shards_on_two_nodes_equal_the_sequential_run(two_nodes, sequential, tmp_path):
    out = tmp_path / "ray"
    ok(python_m(ray_shards(out), env=two_nodes["env"]))
    jobs = ray_jobs(out)
    assert [jobs[k]["status"] for k in (0, 1)] == ["completed", "completed"]
    nodes = {n["node_id"]: n["ip"] for n in two_nodes["nodes"]}
    assert {jobs[0]["node_id"], jobs[1]["node_id"]} == set(nodes), "each node (1 CPU) ran one shard"
    slots = records(out / "slots")
    for shard, numbers in SHARD_SLOTS.items():
        for k in numbers:  # the slot record names the process (and, with the node hook, the node) of its shard's job
            assert slots[k]["shard"] == shard and slots[k]["pid"] == jobs[shard]["pid"]
            assert slots[k].get("node", jobs[shard]["node_id"]) == jobs[shard]["node_id"]
    evaluate_equals_sequential(out / "slots", tmp_path / "evaluate", sequential)


@pytest.mark.cluster
def test_a_lost_ray_node_costs_only_its_unfinished_slots(two_nodes, sequential, tmp_path):
    """No retries: the command reports the lost job in one line; the same command again trains
    only the lost shard's unfinished slot."""
    out = tmp_path / "lost"
    args = ray_shards(out, "hydra.launcher.remote.max_retries=0")
    with kill_node_during_its_second_slot(two_nodes, args, out) as (command, lost, finished_pid):
        assert command.wait(timeout=600) == 1
    last = out.with_suffix(".log").read_text().strip().splitlines()[-1]
    assert last.startswith(f"tiled_hydra: error: job #{lost} (ensemble.shard={lost}) was lost"), last
    before = records(out / "slots")
    assert sorted(before) == sorted([*SHARD_SLOTS[1 - lost], SHARD_SLOTS[lost][0]])  # the lost node's second slot only

    again = ok(python_m(args, env=two_nodes["env"]))  # the same command, on the surviving head node
    after = records(out / "slots")
    assert sorted(after) == [0, 1, 2, 3], again.stderr[-2000:]
    for k in before:  # finished slots were found, not trained again
        assert after[k]["sha256"] == before[k]["sha256"] and after[k]["started"] == before[k]["started"]
    retrained = after[SHARD_SLOTS[lost][1]]
    assert retrained["pid"] != finished_pid and retrained["pid"] == ray_jobs(out)[lost]["pid"]
    assert ray_jobs(out)[lost]["node_ip"] == "127.0.0.2"
    shard_file = json.loads(next((out / "sweep").glob(f"*ensemble.shard={lost}*/shard.json")).read_text())
    assert shard_file["resumed_slots"] == 1 and shard_file["missing_slots"] == []
    evaluate_equals_sequential(out / "slots", tmp_path / "evaluate", sequential)


@pytest.mark.cluster
def test_ray_retries_a_lost_nodes_job_on_a_live_node(two_nodes, sequential, tmp_path):
    """Ray's retry (the default max_retries=3): the command itself finishes after the node is
    lost; the retried shard keeps the slot its lost node had finished."""
    out = tmp_path / "retried"
    with kill_node_during_its_second_slot(two_nodes, ray_shards(out), out) as (command, lost, finished_pid):
        assert command.wait(timeout=900) == 0, out.with_suffix(".log").read_text()[-3000:]
    slots, jobs = records(out / "slots"), ray_jobs(out)
    first, second = SHARD_SLOTS[lost]
    assert slots[first]["pid"] == finished_pid, "the slot finished on the lost node was kept"
    assert slots[second]["pid"] == jobs[lost]["pid"] != finished_pid and jobs[lost]["node_ip"] == "127.0.0.2"
    evaluate_equals_sequential(out / "slots", tmp_path / "evaluate", sequential)


# -- SLURM -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm_cluster():
    """Two slurmd nodes (n1, n2, 1 CPU each), slurmctld and munged of tools/cluster/slurm_up.sh."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        pytest.skip("hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")) or os.geteuid() != 0:
        pytest.skip("SLURM is not installed, or not root: bash tools/cluster/install.sh")
    state = Path(tempfile.mkdtemp(prefix="ths", dir="/tmp"))
    env = {**ENV, "SLURM_PORT": str(free_port(3)), "SLURM_CONF": str(state / "slurm.conf")}
    try:
        up = subprocess.run(["bash", str(TOOLS / "slurm_up.sh"), str(state)], env=env, capture_output=True, text=True,
                            timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"state": state, "env": env}
    finally:
        subprocess.run(["bash", str(TOOLS / "slurm_down.sh"), str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def slurm_shards(out: Path, overrides: list[str] = TINY) -> list[str]:
    return ["-m", "hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", *overrides, *SHARDS, f"ensemble.checkpoint_dir={out / 'slots'}",
            f"hydra.sweep.dir={out / 'sweep'}"]


def slurm_jobs(out: Path) -> dict[int, str]:
    """{array index (= shard): SLURM job id} from submitit's folders (SWEEP/.submitit/ID_K)."""
    folders = [p.name for p in (out / "sweep" / ".submitit").iterdir() if p.is_dir() and re.fullmatch(r"\d+_\d+", p.name)]
    return {int(name.split("_")[1]): name for name in folders}


def slurm_state(job: str, env: dict) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()


def slurm_node(job: str, env: dict) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next(f.split("=", 1)[1] for f in shown.split() if f.startswith("NodeList="))


@pytest.mark.cluster
def test_slurm_shards_on_two_nodes_equal_the_sequential_run(slurm_cluster, sequential, tmp_path):
    out = tmp_path / "slurm"
    env = slurm_cluster["env"]
    ok(python_m(slurm_shards(out), env=env))
    jobs = slurm_jobs(out)
    nodes = {shard: slurm_node(job, env) for shard, job in jobs.items()}
    assert sorted(nodes.values()) == ["n1", "n2"], nodes  # one shard per node (1 CPU each)
    slots = records(out / "slots")
    for shard, numbers in SHARD_SLOTS.items():
        assert len({slots[k]["pid"] for k in numbers}) == 1 and slots[numbers[0]]["shard"] == shard
        assert slots[numbers[0]].get("node", nodes[shard]) == nodes[shard]
    evaluate_equals_sequential(out / "slots", tmp_path / "evaluate", sequential)


@pytest.mark.cluster
def test_a_preempted_slurm_shard_is_requeued_and_resumes_its_slots(slurm_cluster, tmp_path):
    """scontrol requeue of a shard job while it trains its second slot (what preemption with
    PreemptMode=REQUEUE does): the job is killed, runs again, finds its first slot trained and
    trains the second; the multirun command finishes by itself."""
    out, env = tmp_path / "preempted", slurm_cluster["env"]
    ok(python_m([*SLOW, f"hydra.run.dir={tmp_path / 'sequential'}"]))
    sequential = results(tmp_path / "sequential")
    with started(slurm_shards(out, SLOW), env, out.with_suffix(".log")) as command:
        shard, training_pid, finished = requeue_during_second_slot(command, out, env)
    after = records(out / "slots")
    first, second = SHARD_SLOTS[shard]
    assert after[first]["sha256"] == finished["sha256"] and after[first]["pid"] == finished["pid"]
    assert after[second]["pid"] not in (training_pid, finished["pid"]), "the second slot was trained by the requeued job"
    shard_file = json.loads(next((out / "sweep").glob(f"*ensemble.shard={shard}*/shard.json")).read_text())
    assert shard_file["resumed_slots"] == 1 and shard_file["missing_slots"] == []
    evaluate_equals_sequential(out / "slots", tmp_path / "evaluate", sequential, SLOW)


def requeue_during_second_slot(command: subprocess.Popen, out: Path, env: dict) -> tuple[int, int, dict]:
    """scontrol requeue the first shard job seen training its second slot; wait for the command to
    finish. Returns (shard, pid that was training, the record of the shard's finished slot)."""
    slots, deadline, target = out / "slots", time.monotonic() + 600, None
    while target is None:
        assert command.poll() is None and time.monotonic() < deadline, out.with_suffix(".log").read_text()[-2000:]
        for shard, (first, second) in SHARD_SLOTS.items():
            lock = slots / f"slot_{second:03d}.lock"
            pid = lock.read_text().strip() if lock.exists() else ""
            if (slots / f"slot_{first:03d}.json").exists() and pid.isdigit() and not lock.with_suffix(".json").exists():
                target = shard, int(pid)
                break
        time.sleep(0.1)
    shard, training_pid = target
    job = slurm_jobs(out)[shard]
    finished = json.loads((slots / f"slot_{SHARD_SLOTS[shard][0]:03d}.json").read_text())
    ok(subprocess.run(["scontrol", "requeue", job], env=env, capture_output=True, text=True))
    deadline = time.monotonic() + 120
    while alive(training_pid):
        assert time.monotonic() < deadline, "the requeued job's process was not killed"
        time.sleep(0.2)
    # SLURM holds a requeued job for a while (pending, reason BeginTime); release it instead of waiting.
    while slurm_state(job, env) != "PENDING":
        assert time.monotonic() < deadline, f"job {job} was not requeued: {slurm_state(job, env)}"
        time.sleep(0.5)
    ok(subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True, text=True))
    assert command.wait(timeout=900) == 0, out.with_suffix(".log").read_text()[-3000:]
    return shard, training_pid, finished


# -- placement and rendering (no daemon: the default suite) -----------------------------------------
@pytest.mark.parametrize("env,workers,expected", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4, ["0", "1", "2", "3"]),  # one GPU per worker
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, 4, ["2", "3", "2", "3"]),  # SLURM gave devices 2 and 3: round-robin
    ({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}, 2, ["GPU-a1", "GPU-b2"]),  # UUIDs (MIG) pass through
    ({"SLURM_JOB_GPUS": "4,5"}, 2, ["4", "5"]),  # no CUDA_VISIBLE_DEVICES: SLURM's list
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "4"}, 2, [None, None]),  # hidden on purpose: CPU
    ({}, 3, [None, None, None]),  # a CPU machine
])
def test_each_local_worker_gets_its_own_device(env, workers, expected):
    assert worker_devices(workers, visible_devices(env)) == expected
    for worker, device in enumerate(expected):
        assert worker_env(worker, workers, env) == ({} if device is None else {"CUDA_VISIBLE_DEVICES": device})


def test_the_node_of_a_slot_comes_from_the_launcher_or_slurm():
    assert node_name({"TILED_HYDRA_NODE": "ab12", "SLURMD_NODENAME": "n1"}) == "ab12"
    assert node_name({"SLURMD_NODENAME": "n2"}) == "n2"
    assert node_name({}) is None


def test_a_four_gpu_node_job_renders_gpus_and_gres(compose_cfg, tmp_path, monkeypatch):
    # One job with a node's 4 GPUs: ensemble.workers=4 puts one local worker on each (worker_env above).
    cfg = compose_cfg(["+setup=ens9", "model=fastflow", "ensemble.workers=4", "hydra/launcher=slurm_gpu",
                       "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "hydra.launcher.gres=gpu:4",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    script = sbatch_script(cfg, tmp_path, monkeypatch)
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --gres=gpu:4", "#SBATCH --partition=gpu", "#SBATCH --ntasks-per-node=1"):
        assert line in script, line


def test_the_cpu_slurm_config_asks_for_no_gpu(compose_cfg, tmp_path, monkeypatch):
    cfg = compose_cfg(["+setup=ens4", "hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    script = sbatch_script(cfg, tmp_path, monkeypatch)
    assert "#SBATCH --cpus-per-task=4" in script and "#SBATCH --partition=debug" in script
    assert "gpus" not in script and "gres" not in script


def test_the_ray_launcher_config_names_our_launcher(compose_cfg):
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    cfg = compose_cfg(["+setup=ens4", "hydra/launcher=ray_cluster"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert issubclass(get_class(launcher._target_), Launcher)
    assert launcher.remote.max_retries == 3 and launcher.remote.max_calls == 1 and launcher.address == "auto"
