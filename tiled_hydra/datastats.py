"""Defect size per dataset category, the x-axis of paper Fig. 7.

defect_share = mean over the defective test images of (anomalous pixels / image pixels).
Every run also records it in results.json (``defect_share``, from the test masks it loaded), so
compare draws Fig. 7 from runs alone; this command measures datasets without running a model.

    python -m tiled_hydra.datastats dataset=mvtec dataset.root=DIR dataset.category=bottle,cable,...
    python -m tiled_hydra.compare SOURCE --datastats outputs/datastats.json

The dataset is composed from conf/ exactly as a run composes it (any Hydra override works) and
loaded through its loader; a comma-separated dataset.category measures several categories.
Results are merged into the JSON file (default outputs/datastats.json), keyed "dataset/category".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tiled_hydra.data.base import AnomalyData, Split
from tiled_hydra.errors import DataError, TiledHydraError, instantiate_checked

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DEFAULT_OUT = Path("outputs/datastats.json")


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


def compose_dataset(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides).dataset


def measure(overrides: list[str], image_size: int) -> dict[str, dict]:
    """{"dataset/category": stats} for every category named in ``dataset.category=a,b,...``."""
    categories = [None]
    rest = []
    for item in overrides:
        if item.startswith("dataset.category="):
            categories = item.split("=", 1)[1].split(",")
        else:
            rest.append(item)
    out = {}
    for category in categories:
        node = compose_dataset(rest + ([f"dataset.category={category}"] if category else []))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tiled_hydra.datastats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides choosing the dataset, e.g. dataset=mvtec dataset.root=DIR")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file to merge into (default {DEFAULT_OUT})")
    parser.add_argument("--image-size", type=int, default=256,
                        help="side the masks are resized to; the share barely depends on it (default 256)")
    args = parser.parse_args(argv)
    try:
        stats = measure(args.overrides, args.image_size)
    except (TiledHydraError, ValueError) as err:
        print(f"tiled_hydra.datastats: error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # Hydra's own config errors (unknown dataset, bad override) are multi-line
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"tiled_hydra.datastats: error: {str(err).splitlines()[0]}", file=sys.stderr)
            sys.exit(1)
        raise
    update_json(args.out, stats)
    for key, value in stats.items():
        print(f"{key}: defect share {100 * value['defect_share']:.2f}% of the image "
              f"(median {100 * value['defect_share_median']:.2f}%, {value['defective_images']} defective images)")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
