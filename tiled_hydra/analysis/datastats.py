"""Defect size per dataset category, the x-axis of paper Fig. 7.

defect_share = mean over the defective test images of (anomalous pixels / image pixels).
Every run also records it in results.json (``defect_share``, from the test masks it loaded), so
compare draws Fig. 7 from runs alone; this command measures datasets without running a model.

    python -m tiled_hydra.datastats dataset=mvtec dataset.root=DIR 'dataset.category=[bottle,cable]'
    python -m tiled_hydra.compare sources=SOURCE datastats=outputs/datastats.json

The dataset is composed from conf/ exactly as a run composes it (any Hydra override works) and
loaded through its loader; a list of categories measures each.
Results are merged into the JSON file (default outputs/datastats.json), keyed "dataset/category".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from tiled_hydra.data.base import AnomalyData, Split
from tiled_hydra.errors import DataError, instantiate_checked



def defect_shares(split: Split) -> torch.Tensor | None:
    """Share of anomalous pixels of every defective image of a split; None without pixel masks."""
    if split.masks is None:
        return None
    return split.masks[split.labels == 1].flatten(1).float().mean(dim=1)


def defect_share(split: Split) -> float | None:
    """Mean share of anomalous pixels per defective image (results.json key ``defect_share``)."""
    shares = defect_shares(split)
    return None if shares is None or len(shares) == 0 else round(float(shares.mean()), 6)


def defect_stats(data: AnomalyData) -> dict:
    """Defect share of the test split: mean, median and number of defective images."""
    shares = defect_shares(data.test)
    if shares is None:
        raise DataError("this dataset has no pixel masks, so it has no defect size")
    if len(shares) == 0:
        raise DataError("no defective test image")
    return {
        "defect_share": float(shares.mean()),
        "defect_share_median": float(shares.median()),
        "defective_images": len(shares),
    }


def measure(dataset: DictConfig, image_size: int) -> dict[str, dict]:
    """{"dataset/category": stats} for the dataset node's category, or each of a list of them."""
    categories = dataset.category if isinstance(dataset.category, ListConfig) else [dataset.category]
    out = {}
    for category in categories:
        node = dataset.copy()
        node.category = category
        data = instantiate_checked(node, image_size=[image_size, image_size])
        try:
            stats = defect_stats(data)
        except DataError as err:
            raise DataError(f"{node.name}/{node.category}: {err}") from None
        out[f"{node.name}/{node.category}"] = {"dataset": str(node.name), "category": str(node.category),
                                               **stats, "image_size": image_size}
        del data
    return out


def update_json(path: Path, stats: dict[str, dict]) -> dict[str, dict]:
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(stats)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True))
    return merged
