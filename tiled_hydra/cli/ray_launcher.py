"""Hydra launcher on a running Ray cluster: each job of a multirun is one Ray task (``hydra/launcher=ray_cluster``).

An adapter, not a scheduler: every job is submitted as a ``ray.remote`` task with the resources
of ``hydra.launcher.remote`` and Ray places it; this process waits for all of them. Hydra's own
Ray plugin (hydra-ray-launcher) is not used because, with this project:

- it runs the job in the Ray worker and lets its ``sys.exit`` through: Ray takes a job's one-line
  usage error (exit 2) for a crashed worker, retries it three times and ends in a traceback;
- it passes ``object_store_memory`` to ``ray.init``, which Ray refuses when joining a cluster;
- it requires ``cloudpickle<3``, which makes pip downgrade joblib (joblib 1.6 needs
  ``cloudpickle>=3``; the joblib launcher ships with this package).

Here a job that exits (a usage error, a failed run) is a finished task with its exit code and
last stderr line; only a lost node or a killed worker fails the task, and Ray retries it
(``max_retries``) on a node that is still alive. A retried shard job trains only its missing
slots: slots finished on the lost node are kept (per-slot checkpoints in the shared
``ensemble.checkpoint_dir``). Each job runs in this command's working directory (relative paths
mean the same on every node of a shared filesystem) and in the sweep directory resolved here
(``${now:...}`` is not re-read on every node). ``SWEEP_DIR/ray_jobs.json`` lists where each job
ran: Ray node id and address, pid, times, exit code.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from tiled_hydra.slots.cluster import NODE_ENV
from tiled_hydra.errors import ConfigError, TiledHydraError

log = logging.getLogger("tiled_hydra")

JOBS_FILE = "ray_jobs.json"
ERROR_PREFIX = "tiled_hydra: error: "


@dataclass
class JobResult:
    """What a job's task sends back: Hydra's JobReturn (None when the job exited) and where it ran."""

    job_return: JobReturn | None
    exit_code: int
    error: str | None  # the job's last stderr line when it exited non-zero
    node_id: str
    node_ip: str
    pid: int
    started: float
    finished: float


class _StderrTail(io.TextIOBase):
    """sys.stderr that also keeps its last non-empty line (a failing job's one-line error)."""

    def __init__(self, stream):
        self.stream, self.last, self._partial = stream, "", ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.last = line.strip()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def last_line(self) -> str:
        return self._partial.strip() or self.last


def run_remote(hydra_context, sweep_config: DictConfig, task_function, singleton_state: dict, cwd: str) -> JobResult:
    """One job, inside its Ray task (runs on the node Ray chose)."""
    import ray

    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    os.environ[NODE_ENV] = node_id  # the slot records name the node (tiled_hydra.slots.cluster.node_name)
    if Path(cwd).is_dir():
        os.chdir(cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = context.get_task_id()
    started = time.time()
    tail, stderr = _StderrTail(sys.stderr), sys.stderr
    sys.stderr = tail
    try:
        job_return = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                             job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        code, error = 0, None
    except SystemExit as exit:  # the job's own one-line error (tiled_hydra.cli.common.fail)
        code = exit.code if isinstance(exit.code, int) else 1
        job_return, error = None, (tail.last_line() or f"exit code {code}") if code else None
    finally:
        sys.stderr = stderr
    return JobResult(job_return, code, error, node_id, ray.util.get_node_ip_address(), os.getpid(), started, time.time())


def connect(address: str | None, log_to_driver: bool, init: dict) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING, **init)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"hydra.launcher.address={address}: cannot join a Ray cluster ({first}); start one "
                          f"(ray start --head, or tools/cluster/ray_local.py up) or set RAY_ADDRESS") from None


def remote_function(options: dict):
    """run_remote as a Ray remote function with ``hydra.launcher.remote``'s options."""
    import ray

    try:
        return ray.remote(**options)(run_remote)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.launcher.remote={options}: {err}") from None


def job_label(num: int, overrides: Sequence[str]) -> str:
    shown = [o for o in filter_overrides(overrides) if o.startswith("ensemble.shard=")] or list(filter_overrides(overrides))
    return f"job #{num} ({' '.join(shown)})"


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Submit every job, wait for all of them; a job that exited non-zero or was lost ends the
    command with one line (after the other jobs finished: their slots are kept)."""
    from tiled_hydra.cli.common import fail

    config = launcher.config
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        connect(launcher.address, launcher.log_to_driver, dict(launcher.init or {}))
        remote = remote_function(dict(launcher.remote or {}))
    except TiledHydraError as err:
        fail("tiled_hydra", err)
    import ray

    jobs: dict[Any, tuple[int, Sequence[str]]] = {}
    log.info("Ray launcher: %d job(s) on %s, sweep dir %s", len(job_overrides), ray.get_runtime_context().gcs_address, sweep_dir)
    for num, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = num
            sweep_config.hydra.sweep.dir = str(sweep_dir)
        ref = remote.remote(launcher.hydra_context, sweep_config, launcher.task_function, Singleton.get_state(), os.getcwd())
        jobs[ref] = (num, overrides)
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
    returns, rows, failures = {}, {}, []
    pending = list(jobs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            num, overrides = jobs[done[0]]
            row = {"job": num, "overrides": list(overrides)}
            try:
                result: JobResult = ray.get(done[0])
            except ray.exceptions.RayError as err:  # the node or the worker process was lost (after Ray's retries)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                rows[num] = {**row, "status": "lost", "error": first}
                failures.append((1, f"{job_label(num, overrides)} was lost ({type(err).__name__}: {first[:200]}); "
                                    "run the same command again: it trains only the slots not finished"))
                log.info("%s lost: %s", job_label(num, overrides), first)
            else:
                fields = asdict(result)
                del fields["job_return"]
                run_dir = result.job_return.working_dir if result.job_return is not None else None
                rows[num] = {**row, "status": "completed" if result.exit_code == 0 else "exited", "run_dir": run_dir, **fields}
                where = f"node {result.node_ip} ({result.node_id[:8]}), pid {result.pid}"
                if result.exit_code:
                    message = result.error.removeprefix(ERROR_PREFIX)
                    failures.append((result.exit_code, f"{job_label(num, overrides)} on {where}: {message}"))
                else:
                    returns[num] = result.job_return
                log.info("%s %s on %s in %.1f s", job_label(num, overrides),
                         "done" if result.exit_code == 0 else f"exited with code {result.exit_code}", where,
                         result.finished - result.started)
            write_jobs(sweep_dir, rows)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    if failures:
        code, first = failures[0]
        more = f" (and {len(failures) - 1} more of {len(jobs)} jobs; see {sweep_dir / JOBS_FILE})" if len(failures) > 1 else ""
        print(f"{ERROR_PREFIX}{first}{more}", file=sys.stderr)
        sys.exit(code)
    return [returns[num] for num in sorted(returns)]


def write_jobs(sweep_dir: Path, rows: dict[int, dict]) -> None:
    from tiled_hydra.rundir import write_atomic

    write_atomic(sweep_dir / JOBS_FILE, json.dumps([rows[k] for k in sorted(rows)], indent=2))


def launcher_config(address: str | None, log_to_driver: bool, init: DictConfig | dict | None,
                    remote: DictConfig | dict | None) -> tuple[str | None, bool, dict, dict]:
    """The launcher's settings as plain values (Hydra passes DictConfigs)."""
    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})

    return address, bool(log_to_driver), plain(init), plain(remote)


def register() -> None:
    """Make ``hydra/launcher=ray_cluster`` known to Hydra in any working directory. Hydra finds
    launchers by listing the ``hydra_plugins`` package, which an editable install
    (``pip install -e``) does not list outside the repository; importing the class works there."""
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.tiled_hydra_ray.ray_cluster_launcher import RayClusterLauncher
    except ImportError:
        return
    Plugins.instance().register(RayClusterLauncher)
