"""Where a job runs on a cluster: the node that trains a slot, and the GPU each local worker gets.

``node_name()`` names the cluster node of this process for the slot records: the Ray node id
(set by the Ray launcher, :mod:`tiled_hydra.cli.ray_launcher`) or SLURM's node name; None on a
plain machine. Several nodes can share one host (a test cluster, or containers), so the host
name alone does not say which node trained a slot.

``worker_devices`` places the local workers of ``ensemble.workers=W`` on the GPUs the job was
given: SLURM (``--gpus-per-node``/``--gres``) and Ray set ``CUDA_VISIBLE_DEVICES`` to the job's
devices; worker k sees only device k (round-robin when there are fewer devices than workers), so
W workers on a W-GPU node train one slot per GPU. Worker 0 is the job's own process, whose
``cuda:0`` is already the first device of the list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

NODE_ENV = "TILED_HYDRA_NODE"  # set by the Ray launcher in each job's process: the Ray node id


def node_name(env: Mapping[str, str] = os.environ) -> str | None:
    """The cluster node this process runs on: the Ray node id, SLURM's node name, else None."""
    return env.get(NODE_ENV) or env.get("SLURMD_NODENAME") or None


def visible_devices(env: Mapping[str, str] = os.environ) -> list[str]:
    """The GPUs this job may use, as CUDA names them: CUDA_VISIBLE_DEVICES (set by SLURM's gres
    plugin, Ray or the user), else SLURM's job or step GPU list; [] when none is set. Entries
    may be indices or UUIDs (MIG); an empty or "-1"/"NoDevFiles" value means no GPU."""
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = env.get(key)
        if value is not None:
            devices = [d.strip() for d in value.split(",") if d.strip()]
            return [] if devices in ([], ["-1"], ["NoDevFiles"]) else devices
    return []


def worker_devices(workers: int, devices: list[str]) -> list[str | None]:
    """The device each of ``workers`` local workers trains on (index = worker, 0 = this process):
    device k for worker k, round-robin over fewer devices; None for every worker without GPUs."""
    if not devices:
        return [None] * workers
    return [devices[k % len(devices)] for k in range(workers)]


def worker_env(worker: int, workers: int, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment additions for local worker ``worker`` of ``workers``: CUDA_VISIBLE_DEVICES
    naming its own device; {} when the job has no GPU (the worker inherits the CPU setting)."""
    device = worker_devices(workers, visible_devices(env))[worker]
    return {} if device is None else {"CUDA_VISIBLE_DEVICES": device}
