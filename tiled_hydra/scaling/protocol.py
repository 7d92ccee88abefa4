"""A timing protocol that survives a shared machine.

Every resolution's slot is fitted first; then the resolutions are timed round-robin: ``warmup``
untimed rounds, then ``repeats`` timed rounds, each round one step of every resolution in turn.  A
load spike therefore lands on one step of every resolution around it, not on all steps of one
resolution, and the median per resolution drops it.  A point whose relative IQR (IQR / median)
exceeds ``max_relative_iqr`` is timed again in extra rounds (only the noisy points, at most
``max_extra_rounds``); one that stays above is flagged ``noisy``.  The order actually run is kept
(``rounds``) and written to scaling.json.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from omegaconf import DictConfig

from tiled_hydra.errors import ConfigError

log = logging.getLogger("tiled_hydra")


class Bench(Protocol):
    resolution: int

    def warm(self) -> None: ...

    def timed(self) -> dict: ...


@dataclass(frozen=True)
class TimingProtocol:
    warmup: int  # untimed rounds
    repeats: int  # timed rounds
    max_relative_iqr: float  # a point above it is re-measured, then flagged
    max_extra_rounds: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig, device: torch.device) -> "TimingProtocol":
        timing = cfg.timing
        per_device = timing.cuda if device.type == "cuda" else timing.cpu
        protocol = cls(int(per_device.warmup), int(per_device.repeats), float(timing.max_relative_iqr),
                                  int(timing.max_extra_rounds))
        if protocol.warmup < 0 or protocol.repeats < 1 or protocol.max_relative_iqr < 0 or protocol.max_extra_rounds < 0:
            raise ConfigError(f"timing: need {device.type}.warmup >= 0, {device.type}.repeats >= 1, max_relative_iqr >= 0 "
                              f"and max_extra_rounds >= 0; got {protocol.warmup}, {protocol.repeats}, "
                              f"{protocol.max_relative_iqr}, {protocol.max_extra_rounds}")
        return protocol

    def as_dict(self) -> dict:
        return asdict(self)


def spread(values) -> dict:
    """Median, quartiles (linear interpolation), IQR, min, max and IQR / median of the samples."""
    v = np.asarray(values, dtype=np.float64)
    q1, median, q3 = (float(q) for q in np.percentile(v, [25, 50, 75]))
    return {"median": median, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": float(v.min()), "max": float(v.max()),
            "relative_iqr": (q3 - q1) / median if median > 0 else 0.0, "n": int(v.size)}


def round_robin(benches: list[Bench], protocol: TimingProtocol) -> tuple[dict[int, list[dict]], list[dict]]:
    """Time every bench round-robin (module docstring): ({side: [timed samples]}, rounds run in order)."""
    sides = [b.resolution for b in benches]
    by_side = {b.resolution: b for b in benches}
    rounds: list[dict] = []
    for _ in range(protocol.warmup):
        for bench in benches:
            bench.warm()
        rounds.append({"kind": "warmup", "sides": list(sides)})
    samples: dict[int, list[dict]] = {side: [] for side in sides}
    for _ in range(protocol.repeats):
        for bench in benches:
            samples[bench.resolution].append(bench.timed())
        rounds.append({"kind": "timed", "sides": list(sides)})
    for _ in range(protocol.max_extra_rounds):
        noisy = [s for s in sides if relative_iqr(samples[s]) > protocol.max_relative_iqr]
        if not noisy:
            break
        for side in noisy:
            samples[side].append(by_side[side].timed())
        rounds.append({"kind": "extra", "sides": noisy})
    return samples, rounds


def relative_iqr(samples: list[dict]) -> float:
    return spread([s["seconds"] for s in samples])["relative_iqr"]


def component_medians(samples: list[dict], total: float) -> dict[str, float]:
    """Median seconds per component; ``other`` takes what the medians leave of the median total, so a
    stacked bar is as tall as the point it stands for."""
    names = list(samples[0]["components"])
    out = {name: float(np.median([s["components"][name] for s in samples])) for name in names if name != "other"}
    if "other" in names:
        out["other"] = max(0.0, total - sum(out.values()))
    return out


def point_record(info: dict, counted: dict, peaks: list[int], samples: list[dict], mem_kind: str,
                 max_relative_iqr: float | None = None) -> dict:
    """One resolution's row of scaling.json: counted bytes per component (Eq. 1-3), the median peak
    of the memory steps, and the median time per image with its spread."""
    state, activation = counted["state"], counted["activation"]
    seconds = spread([s["seconds"] for s in samples])
    memory = spread(peaks)
    components = component_medians(samples, seconds["median"])
    return {
        **info,
        "components": {name: {"state_bytes": state[name], "activation_bytes": activation[name],
                              "counted_bytes": state[name] + activation[name], "seconds": components.get(name, 0.0)}
                       for name in state},
        "counted_bytes": sum(state.values()) + sum(activation.values()),
        "state_bytes": sum(state.values()),
        "activation_bytes": sum(activation.values()),
        "peak_bytes": int(round(memory["median"])),
        "peak_bytes_min": int(memory["min"]),
        "peak_bytes_max": int(memory["max"]),
        "mem_kind": mem_kind,
        "seconds": seconds["median"],
        "seconds_q1": seconds["q1"],
        "seconds_q3": seconds["q3"],
        "seconds_min": seconds["min"],
        "seconds_max": seconds["max"],
        "seconds_relative_iqr": seconds["relative_iqr"],
        "timed_steps": seconds["n"],
        "noisy": max_relative_iqr is not None and seconds["relative_iqr"] > max_relative_iqr,
        "seconds_samples": [s["seconds"] for s in samples],
    }
