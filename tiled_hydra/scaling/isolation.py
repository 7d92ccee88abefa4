"""Each resolution's slot in a fresh process (``isolation: process``), driven from the study.

Measured peak memory on a CPU is resident memory above a baseline; in one process a resolution
inherits what earlier ones left (heap the allocator keeps, caches sized for another input), and
the inheritance depends on the order: PaDiM's step above its baseline read 132 MiB at 768 px in one
process after 640 px had read 136 MiB, 107 MiB when 768 px came first, and 89 MiB in a fresh
process (docs/scaling.md).
A worker process per resolution fits its slot, measures its counts and peaks before any other
resolution has run in it, then answers timing requests one at a time, so the round-robin timing
still runs one step at a time on the machine.

The worker and the study talk over a pipe: (command, argument) -> ("ok", value) | ("error", kind, text).
"""

from __future__ import annotations

import logging
import multiprocessing
import traceback

import torch
from omegaconf import DictConfig, OmegaConf

from tiled_hydra.errors import ConfigError, DataError, TiledHydraError

log = logging.getLogger("tiled_hydra")
ERRORS = {"ConfigError": ConfigError, "DataError": DataError, "TiledHydraError": TiledHydraError}


def pin_threads(threads: int | None) -> dict:
    """Set torch's (and faiss', when installed) intra-op threads; returns what is in force."""
    if threads:
        torch.set_num_threads(int(threads))
    out = {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads()}
    try:
        import faiss

        if threads:
            faiss.omp_set_num_threads(int(threads))
        out["faiss"] = faiss.omp_get_max_threads()
    except ImportError:  # faiss is only PatchCore's
        pass
    return out


def _serve(conn, container: dict, resolution: int, device: str, checkpoint_dir: str, threads: int | None) -> None:
    """The worker's loop (runs in the child)."""
    try:
        from tiled_hydra.build import build_frozen_backbone
        from tiled_hydra.scaling.measure import make_bench

        pin_threads(threads)
        cfg = OmegaConf.create(container)
        backbone = build_frozen_backbone(cfg, fold_batch_norm=False)
        bench = make_bench(cfg, backbone, resolution, torch.device(device), checkpoint_dir)
        del backbone  # the slot holds it
        conn.send(("ok", bench.describe()))
    except Exception as err:  # noqa: BLE001 - reported to the study, which raises it there
        conn.send(("error", type(err).__name__, str(err) if isinstance(err, TiledHydraError) else traceback.format_exc()))
        return
    while True:
        command = conn.recv()
        if command == "close":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(bench, command)()))
        except Exception as err:  # noqa: BLE001
            conn.send(("error", type(err).__name__, str(err) if isinstance(err, TiledHydraError) else traceback.format_exc()))


class RemoteBench:
    """A :class:`tiled_hydra.scaling.measure.SlotBench` in its own process, with the same methods."""

    def __init__(self, cfg: DictConfig, resolution: int, device: torch.device, checkpoint_dir, threads: int | None):
        self.resolution = resolution
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
        self._conn, child = context.Pipe()
        container = OmegaConf.to_container(cfg, resolve=False)  # ${setup.tile_size} resolves per side in the worker
        self._process = context.Process(target=_serve, args=(child, container, resolution, str(device), str(checkpoint_dir),
                                                             threads), daemon=True)
        self._process.start()
        child.close()
        self._info = self._answer()

    def _answer(self):
        try:
            reply = self._conn.recv()
        except EOFError:
            raise TiledHydraError(f"the measuring process of {self.resolution} px ended without an answer "
                                  f"(exit code {self._process.exitcode}; out of memory?)") from None
        if reply[0] == "ok":
            return reply[1]
        kind, text = reply[1], reply[2]
        raise ERRORS.get(kind, TiledHydraError)(text if kind in ERRORS else f"{self.resolution} px: {text}")

    def _call(self, command: str):
        self._conn.send(command)
        return self._answer()

    def describe(self) -> dict:
        return dict(self._info)

    def count(self) -> dict:
        return self._call("count")

    def warm(self) -> None:
        self._call("warm")

    def peak(self) -> int:
        return self._call("peak")

    def timed(self) -> dict:
        return self._call("timed")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._call("close")
            except (TiledHydraError, OSError, BrokenPipeError):
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
