"""Anomaly-map files, one per image at the image's own size: a run's RUN_DIR/maps/ and predict's
OUTPUT/maps/ share this encoding.

png: 16-bit grey PNG of the map normalised with the postprocessor that labelled the image, so that
the pixel threshold (normalised 0.5) is code 32768 of 65535: ``normalised = code / 65535``, and a
pixel is anomalous where ``code >= 32768``. npy: the raw float32 map on the model's own scale.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tiled_hydra.core.postprocess import Postprocessor
from tiled_hydra.errors import ConfigError

MAP_FORMATS = ("png", "npy")
PNG_MAX = 65535
PNG_THRESHOLD_CODE = 32768  # rint(0.5 * 65535): where the normalised map crosses the pixel threshold
# zlib level 1 instead of PIL's default 6: a 1200x800 16-bit map saves ~3x faster (0.16 s instead of
# 0.55 s, most of the time a map costs) and is 3 % larger.
PNG_COMPRESS_LEVEL = 1


def maps_format(value) -> str | None:
    """``report.maps`` -> "png" | "npy" | None (false: no map files)."""
    if value is False or value is None:
        return None
    if value not in MAP_FORMATS:
        raise ConfigError(f"report.maps={value!r}: choose png, npy or false")
    return str(value)


def at_size(anomaly_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) map -> (H, W) float32, bilinear with half-pixel centres, as the images were resized
    (the same as the pixel metrics' upsampling)."""
    if tuple(anomaly_map.shape) == tuple(size):
        return anomaly_map.float()
    return F.interpolate(anomaly_map[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def encode_png(normalized: np.ndarray) -> np.ndarray:
    """Normalised map in [0, 1] -> uint16 codes, 0.5 -> 32768."""
    return np.rint(np.asarray(normalized, dtype=np.float32) * np.float32(PNG_MAX)).astype(np.uint16)


def decode_png(codes: np.ndarray) -> np.ndarray:
    """uint16 codes -> normalised map in [0, 1] (float32)."""
    return np.asarray(codes, dtype=np.float32) / PNG_MAX


def write_map(stem: Path, raw_map: torch.Tensor, post: Postprocessor, fmt: str) -> Path:
    """``raw_map`` (H, W) at the image's own size -> ``stem``.png or .npy (see module doc); atomic."""
    path = Path(f"{stem}.{fmt}")
    tmp = path.with_name(f".{path.name}.tmp")
    if fmt == "npy":
        with tmp.open("wb") as f:
            np.save(f, raw_map.numpy().astype(np.float32, copy=False))
    else:
        codes = encode_png(post.normalize_maps(raw_map).numpy())
        Image.fromarray(codes).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    os.replace(tmp, path)
    return path


def file_names(paths: list[str], count: int) -> list[str]:
    """One unique file name (without suffix) per image: its path below the images' common folder,
    folders joined by '__' (test/crack/000.png and test/good/000.png differ); the index without paths."""
    if not paths:
        return [f"{i:04d}" for i in range(count)]
    parts = [Path(p).resolve().with_suffix("").parts for p in paths]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    names = ["__".join(p[common:]) for p in parts]
    if len(set(names)) < len(names):  # the same file listed twice: keep both, apart
        names = [f"{i:04d}__{name}" for i, name in enumerate(names)]
    return names
