"""Peak-memory measurement per stage.

On CUDA: peak allocated accelerator memory (``torch.cuda.max_memory_allocated``), reset at
the start of each stage.  On CPU there is no accelerator, so the figure is the process'
resident memory (RSS) above its value when the stage started, sampled by a thread.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time

import psutil
import torch


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS, so RSS above a baseline sees a stage's fresh allocations
    (without it a stage that re-uses memory freed by an earlier one reports ~0, e.g. after a resume)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then under-report re-used memory
        pass


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as peak: ...; peak.bytes``.

    The RSS sampler polls every ``interval`` seconds: finer polling competes with the
    measured work for the GIL, and torch's large buffers live far longer than 10 ms.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda" if self.device.type == "cuda" else "rss"

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        release_host_memory()
        process = psutil.Process()
        self._baseline = process.memory_info().rss
        self._peak = self._baseline

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.bytes = int(self._peak - self._baseline)
