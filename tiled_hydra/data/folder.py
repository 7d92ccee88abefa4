"""A user's own images, one folder per kind, any size or aspect (resized to image_size).

Folders are relative to ``root`` (absolute paths are taken as they are):

- ``normal_dir``: normal images; a seeded ``normal_test_split`` of them is held out for
  testing unless ``normal_test_dir`` gives separate normal test images.
- ``abnormal_dir``: anomalous test images.
- ``mask_dir`` (optional): masks matched by file stem, ``NAME.*`` or ``NAME_mask.*``; any
  non-zero pixel is anomalous. With a mask folder every anomalous image needs a mask;
  without one the dataset has image labels only.
- ``val_normal_dir`` / ``val_abnormal_dir`` (optional): a validation split (masks from ``mask_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np

from tiled_hydra.config import Range, Seed
from tiled_hydra.data.base import AnomalyData, Split
from tiled_hydra.data.images import Sample, read_split, require_images, require_root
from tiled_hydra.errors import ConfigError, DataError


def held_out(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, test): a seeded ``fraction`` of ``files`` goes to test, both keep their sorted order."""
    n_test = int(round(fraction * len(files)))
    chosen = set(np.random.default_rng(seed).permutation(len(files))[:n_test].tolist())
    return [f for i, f in enumerate(files) if i not in chosen], [f for i, f in enumerate(files) if i in chosen]


def mask_index(dataset: str, mask_dir: Path) -> dict[str, Path]:
    """File stem -> mask file."""
    return {p.stem: p for p in require_images(dataset, mask_dir)}


def abnormal_samples(dataset: str, folder: Path, masks: dict[str, Path] | None, mask_dir: Path | None) -> list[Sample]:
    samples = []
    for image in require_images(dataset, folder):
        mask = None
        if masks is not None:
            mask = masks.get(image.stem) or masks.get(f"{image.stem}_mask")
            if mask is None:
                raise DataError(f"{dataset}: no mask for anomalous image {image} in {mask_dir} ({image.stem}.* or {image.stem}_mask.*)")
        samples.append(Sample(image, label=1, defect_type="anomalous", mask=mask))
    return samples


def load_folder(
    root: str | None,
    normal_dir: str,
    abnormal_dir: str,
    image_size,
    category: str = "custom",
    mask_dir: str | None = None,
    normal_test_dir: str | None = None,
    normal_test_split: Annotated[float, Range(0, 1, high_open=True)] = 0.2,
    val_normal_dir: str | None = None,
    val_abnormal_dir: str | None = None,
    seed: Seed = 0,
    name: str = "folder",
) -> AnomalyData:
    """Train on normal images; test on held-out (or separate) normal images and the anomalous ones."""
    base = require_root(name, root)
    if not normal_dir or not abnormal_dir:
        raise ConfigError(f"{name}: set dataset.normal_dir=DIR and dataset.abnormal_dir=DIR (relative to {base})")
    if not 0.0 <= float(normal_test_split) < 1.0:
        raise ConfigError(f"{name}: normal_test_split must be in [0, 1), got {normal_test_split}")

    def path(folder: str | None) -> Path | None:
        return None if not folder else base / Path(folder).expanduser()  # an absolute folder replaces base

    normals = require_images(name, path(normal_dir))
    if normal_test_dir:
        train_files, test_normals = normals, require_images(name, path(normal_test_dir))
    else:
        train_files, test_normals = held_out(normals, float(normal_test_split), int(seed))
        if not train_files:
            raise DataError(f"{name}: normal_test_split={normal_test_split} leaves no training images in {path(normal_dir)}")

    masks = mask_index(name, path(mask_dir)) if mask_dir else None
    with_masks = masks is not None

    def split(normal_files: list[Path], abnormal: str | None, what: str) -> Split:
        samples = [Sample(f, label=0) for f in normal_files]
        if abnormal:
            samples += abnormal_samples(name, path(abnormal), masks, path(mask_dir))
        return read_split(samples, image_size, name, with_masks=with_masks, what=what)

    train = read_split([Sample(f, label=0) for f in train_files], image_size, name, with_masks=False, what="train")
    test = split(test_normals, abnormal_dir, "test")
    val = None
    if val_normal_dir or val_abnormal_dir:
        val = split(require_images(name, path(val_normal_dir)) if val_normal_dir else [], val_abnormal_dir, "val")
    return AnomalyData(train=train, test=test, val=val)
