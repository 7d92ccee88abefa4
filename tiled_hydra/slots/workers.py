"""Local training workers: one command trains a run's slots in W processes on this machine.

Some models do not train faster with more torch threads: EfficientAD's small bfloat16
convolutions take ~83 s per ENS9 slot on one thread and ~91 s on two, so the second core idles.
``ensemble.workers=W`` starts W-1 worker processes, each an ordinary shard job (``ensemble.shard=k
ensemble.num_shards=W``) that trains into this run's checkpoint directory, with the machine's
torch threads split between them. This process trains shard 0 and waits for the workers; then
every slot is on disk and the run evaluates as usual. Slots are seeded per slot, so the result is
the sequential run's. A worker that fails fails the run; a killed command kills its workers
(Linux), and a re-run resumes every finished slot.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from tiled_hydra.errors import TiledHydraError
from tiled_hydra.slots.cluster import worker_env

log = logging.getLogger("tiled_hydra")

WORKERS_DIR = ".workers"  # RUN_DIR/.workers/shard_K: each worker's own run dir and log
# Overrides the workers set themselves (or must not inherit: one W&B run per command, no bars).
OWN_KEYS = ("ensemble.workers", "ensemble.shard", "ensemble.num_shards", "ensemble.stage", "ensemble.checkpoint_dir",
            "hydra.run.dir", "logger", "progress")


class WorkerError(TiledHydraError):
    pass


def worker_overrides(task_overrides: list[str], shard: int, workers: int, checkpoints: Path, worker_dir: Path) -> list[str]:
    """The command line of worker ``shard``: this job's overrides, as a training-only shard job."""
    kept = [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~") not in OWN_KEYS]
    return [*kept, f"ensemble.shard={shard}", f"ensemble.num_shards={workers}", "ensemble.workers=1",
            f"ensemble.checkpoint_dir={checkpoints}", f"hydra.run.dir={worker_dir}", "logger=none", "progress=false"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the worker gets SIGTERM when this process dies (kill -9 included), never orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Workers:
    """W-1 running worker processes of this run (see module doc)."""

    def __init__(self, run_dir: Path, checkpoints: Path, workers: int, task_overrides: list[str]):
        self.workers = workers
        self.threads = max(1, torch.get_num_threads() // workers)
        self.started = time.time()
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.procs: list[tuple[int, subprocess.Popen, Path]] = []
        for shard in range(1, workers):
            worker_dir = Path(run_dir) / WORKERS_DIR / f"shard_{shard}"
            worker_dir.mkdir(parents=True, exist_ok=True)
            log_path = worker_dir / "worker.log"
            cmd = [sys.executable, "-m", "tiled_hydra",
                   *worker_overrides(task_overrides, shard, workers, Path(checkpoints).resolve(), worker_dir)]
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, **worker_env(shard, workers)},
                                        cwd=os.getcwd(),
                                        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            self.procs.append((shard, proc, log_path))
        log.info("ensemble.workers=%d: %d worker process(es) started (%d torch thread(s) each; logs in %s)",
                 workers, workers - 1, self.threads, Path(run_dir) / WORKERS_DIR)

    @property
    def pids(self) -> set[int]:
        return {proc.pid for _, proc, _ in self.procs}

    def wait(self) -> None:
        """Every worker's end; the first failed one raises with its last log line."""
        for shard, proc, log_path in self.procs:
            code = proc.wait()
            if code != 0:
                raise WorkerError(f"ensemble.workers: worker for shard {shard} exited with code {code}: "
                                  f"{last_line(log_path)} (log: {log_path})")

    def stop(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def mark_trained_here(self, records: list[dict]) -> list[dict]:
        """Slots trained by this command (here or by a worker) since it started are not resumed ones."""
        ours = self.pids | {os.getpid()}
        return [{**r, "resumed": False} if r.get("pid") in ours and r.get("started", 0) >= self.started - 1 else r
                for r in records]


def last_line(path: Path) -> str:
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


@contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def local_workers(workers: int, num_slots: int, run_dir: Path, checkpoints: Path, overrides: tuple[str, ...] | list[str]):
    """The run's ``workers - 1`` worker processes while its slots train (None when one process is
    enough); the caller waits for them (``Workers.wait``); on any error they are stopped.
    ``overrides``: this command's own, which the workers repeat."""
    workers = min(workers, num_slots)
    if workers <= 1:
        yield None
        return
    group = Workers(run_dir, checkpoints, workers, list(overrides))
    try:
        with torch_threads(group.threads):
            yield group
    finally:
        group.stop()
