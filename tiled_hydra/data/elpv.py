"""ELPV: real electroluminescence images of solar cells (Buerhop-Lutz et al. 2018, Deitsch et al. 2019).

The PyPI package ``elpv-dataset`` (an optional extra: ``pip install elpv-dataset``; its data
licence, CC BY-NC-SA 4.0, forbids commercial use) ships 2,624 cells as 300x300 gray PNGs
with ``data/labels.csv`` (whitespace separated: path, defect probability 0, 1/3, 2/3 or 1,
cell type mono or poly) next to its loader.

There are image labels only (masks None, so pixel metrics are absent). Cells of probability 0
are normal: a seeded ``train_fraction`` of them trains, the rest are normal test images.
Cells of probability >= ``defect_threshold`` are the anomalous test images; cells between
the two are ambiguous and left out.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from tiled_hydra.config import Range, Seed
from tiled_hydra.data.base import AnomalyData
from tiled_hydra.data.images import Sample, read_split
from tiled_hydra.errors import ConfigError, DataError

CELL_TYPES = ("mono", "poly")


def labels_file(dataset: str) -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise ConfigError(f"{dataset}: the ELPV images come from an optional package: pip install elpv-dataset")
    return Path(spec.origin).parent / "data" / "labels.csv"


def read_labels(dataset: str, path: Path) -> list[tuple[Path, float, str]]:
    """(image file, defect probability, cell type) per cell."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        raise DataError(f"{dataset}: the elpv-dataset package has no label file {path}; reinstall it") from None
    cells = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            image, probability, cell_type = line.split()
            cells.append((path.parent / image, float(probability), cell_type))
        except ValueError:
            raise DataError(f"{dataset}: {path} line {number} is not 'path probability type': {line.strip()!r}") from None
    return cells


def load_elpv(
    image_size,
    category: Literal["all", "mono", "poly"] = "all",
    defect_threshold: Annotated[float, Range(0, 1, low_open=True)] = 0.5,  # probabilities are 0, 1/3, 2/3, 1
    train_fraction: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.8,
    seed: Seed = 0,
    name: str = "elpv",
) -> AnomalyData:
    """ELPV cells of type ``category`` (all, mono or poly), images resized to ``image_size``."""
    if category not in ("all", *CELL_TYPES):
        raise ConfigError(f"{name}: category must be all, mono or poly, got '{category}'")
    if not 0.0 < float(defect_threshold) <= 1.0:
        raise ConfigError(f"{name}: defect_threshold must be in (0, 1], got {defect_threshold}")
    if not 0.0 < float(train_fraction) < 1.0:
        raise ConfigError(f"{name}: train_fraction must be in (0, 1), got {train_fraction}")

    cells = [c for c in read_labels(name, labels_file(name)) if category == "all" or c[2] == category]
    normals = [path for path, probability, _ in cells if probability == 0.0]
    defective = [path for path, probability, _ in cells if probability >= float(defect_threshold)]
    n_train = int(round(float(train_fraction) * len(normals)))
    in_train = np.zeros(len(normals), bool)
    in_train[np.random.default_rng(int(seed)).permutation(len(normals))[:n_train]] = True

    train = [Sample(p, label=0) for p, chosen in zip(normals, in_train) if chosen]
    test = [Sample(p, label=0) for p, chosen in zip(normals, in_train) if not chosen]
    test += [Sample(p, label=1, defect_type="defective") for p in defective]
    return AnomalyData(
        train=read_split(train, image_size, name, with_masks=False, what="train"),
        test=read_split(test, image_size, name, with_masks=False, what="test"),
        val=None,
    )
