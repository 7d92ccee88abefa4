"""Byte sizes as people write them: ``8GiB``, ``512MiB``, ``8GB`` (a unit is required)."""

from __future__ import annotations

import re

from tiled_hydra.errors import ConfigError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
PATTERN = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*")


def parse_bytes(value, key: str = "memory_budget") -> int:
    """'8GiB' -> 8589934592; 'GB' is decimal (10^9), 'GiB' binary (2^30). No unit is an error."""
    text = str(value)
    match = PATTERN.fullmatch(text)
    if not match or match.group(2).upper() not in UNITS:
        raise ConfigError(f"{key}={text}: give a number with a unit, e.g. {key}=8GiB, 512MiB or 8GB")
    number = float(match.group(1))
    if number <= 0:
        raise ConfigError(f"{key}={text}: must be positive")
    return int(round(number * UNITS[match.group(2).upper()]))


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: 1.50 GiB, 312 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value} TiB"  # pragma: no cover
