"""Thresholds and normalisation fitted on the run's validation data (tiled_hydra.core.postprocess),
and the map files predict writes (tiled_hydra.reporting.maps): the same numbers, in numpy."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tiled_hydra_runtime.filters import F32

PNG_MAX = 65535  # 16-bit PNG of the normalised map: the pixel threshold (0.5) is code 32768


@dataclass(frozen=True)
class Postprocessor:
    image_threshold: float
    pixel_threshold: float
    score_min: float
    score_max: float
    map_min: float | None = None
    map_max: float | None = None

    @staticmethod
    def _normalize(values: np.ndarray, threshold: float, low: float, high: float) -> np.ndarray:
        span = high - low if high > low else 1.0
        out = (np.asarray(values, dtype=F32) - F32(threshold)) / F32(span) + F32(0.5)
        return np.clip(out, F32(0), F32(1))

    def normalize_scores(self, scores: np.ndarray) -> np.ndarray:
        """Image scores -> [0, 1], the image threshold at 0.5."""
        return self._normalize(scores, self.image_threshold, self.score_min, self.score_max)

    def normalize_maps(self, maps: np.ndarray) -> np.ndarray:
        """Anomaly maps -> [0, 1], the pixel threshold at 0.5."""
        return self._normalize(maps, self.pixel_threshold, self.map_min, self.map_max)

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """True = anomalous: the raw score at or above the image threshold."""
        return np.asarray(scores, dtype=F32) >= F32(self.image_threshold)

    def masks(self, maps: np.ndarray) -> np.ndarray:
        return np.asarray(maps, dtype=F32) >= F32(self.pixel_threshold)


def write_map(stem: Path, raw_map: np.ndarray, post: Postprocessor, fmt: str) -> Path:
    """``raw_map`` (H, W) -> ``stem``.png (16-bit normalised) or .npy (raw float32); atomic."""
    path = Path(f"{stem}.{fmt}")
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "npy":
        with tmp.open("wb") as f:
            np.save(f, raw_map.astype(F32, copy=False))
    else:
        codes = np.rint(post.normalize_maps(raw_map).astype(np.float64) * PNG_MAX).astype(np.uint16)
        Image.fromarray(codes).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)
    return path
