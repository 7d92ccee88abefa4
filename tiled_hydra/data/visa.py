"""VisA layout: images listed by the split file ``ROOT/split_csv/1cls.csv``.

The CSV has the columns ``object,split,label,image,mask``: ``split`` is train or test,
``label`` normal or anomaly, ``image``/``mask`` are paths relative to ROOT (JPEG images,
PNG masks in which any non-zero pixel is anomalous; normal rows leave ``mask`` empty)::

    candle,train,normal,candle/Data/Images/Normal/0000.JPG,
    candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png

VisA has no validation split, so ``val`` is None.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tiled_hydra.data.base import AnomalyData
from tiled_hydra.data.images import Sample, read_split, require_root
from tiled_hydra.errors import DataError

CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
    "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def read_rows(dataset: str, csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of every data row; a missing file or column is a DataError."""
    if not csv_path.is_file():
        raise DataError(f"{dataset}: split file {csv_path} does not exist")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{dataset}: {csv_path} lacks the column(s) {', '.join(missing)} (needs {','.join(COLUMNS)})")
            return [(reader.line_num, {k: (row[k] or "").strip() for k in COLUMNS}) for row in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{dataset}: cannot parse {csv_path} ({err})") from None


def category_samples(dataset: str, root: Path, category: str) -> dict[str, list[Sample]]:
    csv_path = root / SPLIT_CSV
    rows = read_rows(dataset, csv_path)
    objects = sorted({row["object"] for _, row in rows})
    if category not in objects:
        raise DataError(f"{dataset}: no category '{category}' in {csv_path} (found: {', '.join(objects) or 'none'})")
    if not (root / category).is_dir():
        raise DataError(f"{dataset}: folder {root / category} does not exist (listed in {csv_path})")
    samples: dict[str, list[Sample]] = {"train": [], "test": []}
    for line, row in rows:
        if row["object"] != category:
            continue
        where = f"{csv_path} line {line}"
        if row["split"] not in samples:
            raise DataError(f"{dataset}: {where}: split must be train or test, got '{row['split']}'")
        if row["label"] not in LABELS:
            raise DataError(f"{dataset}: {where}: label must be normal or anomaly, got '{row['label']}'")
        label = LABELS[row["label"]]
        if row["split"] == "train" and label:
            raise DataError(f"{dataset}: {where}: an anomalous image in the train split")
        if not row["image"]:
            raise DataError(f"{dataset}: {where}: empty image path")
        if label and not row["mask"]:
            raise DataError(f"{dataset}: {where}: no mask for anomalous image {root / row['image']}")
        samples[row["split"]].append(
            Sample(
                image=root / row["image"],
                label=label,
                defect_type="anomaly" if label else "good",
                mask=root / row["mask"] if row["mask"] else None,
            )
        )
    for split, found in samples.items():
        if not found:
            raise DataError(f"{dataset}: no {split} images of '{category}' in {csv_path}")
    return samples


def load_visa(root: str | None, category: str, image_size, name: str = "visa") -> AnomalyData:
    """VisA category ``category`` (one of CATEGORIES) with images resized to ``image_size``."""
    root_dir = require_root(name, root)
    samples = category_samples(name, root_dir, str(category))
    train = read_split(samples["train"], image_size, name, with_masks=False, what="train")
    test = read_split(samples["test"], image_size, name, with_masks=True, what="test")
    return AnomalyData(train=train, test=test, val=None)
