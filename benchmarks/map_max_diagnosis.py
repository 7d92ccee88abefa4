"""Why is a run's image AUROC low while its pixel AUPRO is high?

The image score is the maximum of the merged map. For each trained run dir given, this re-predicts
the run's test images (read-only, with the run's own engine) and prints:

- image AUROC of the run's score (``merge.score`` of the tile scores, as results.json has it) and
  of the maximum of the merged map;
- "defect-only" AUROC: defective images scored by the map's maximum *inside* their defect mask,
  normal images by their whole-map maximum: the image AUROC if each defect's own peak were the
  image score. High here and low above means the defects are found but the normal background of
  the same images peaks higher; low here means normal images peak above the defects themselves;
- the share of defective images whose map maximum lies inside the defect mask;
- the median over defective images of (max inside the defect) / (max outside it), and the
  median whole-map maximum of normal images relative to the defective images' inside maximum.

    python benchmarks/map_max_diagnosis.py outputs/hard/brick/efficientnet_lite0/padim_ens9 ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tiled_hydra.metrics.image import image_auroc
from tiled_hydra.build import build_data, open_trained_run


def diagnose(run_dir: Path) -> dict:
    cfg, run = open_trained_run(run_dir, device="cpu")
    test = build_data(cfg, run.grid).test
    if test.masks is None:
        raise SystemExit(f"{run_dir}: the test split has no masks")
    maps, scores = run.engine(keep=True).predict(test.images, measure_memory=False)[0]
    defective = test.labels == 1
    flat, masks = maps.flatten(1), test.masks.flatten(1)
    inside = torch.where(masks, flat, torch.tensor(-torch.inf)).amax(1)
    outside = torch.where(~masks, flat, torch.tensor(-torch.inf)).amax(1)
    whole = flat.amax(1)  # image score = max of the merged map (the run's own may merge tile scores: merge.score)
    oracle = torch.where(defective, inside, whole)
    has_pixels = defective & masks.any(1)  # a defect erased by downsizing has no mask pixel left
    ratio = (inside[has_pixels] / outside[has_pixels]).median()
    normal_max = whole[~defective].median() / inside[has_pixels].median()
    return {
        "run": str(run_dir),
        "image AUROC (run's score)": image_auroc(scores, test.labels),
        "image AUROC (max of map)": image_auroc(whole, test.labels),
        "defect-only AUROC": image_auroc(oracle, test.labels),
        "defective images with max in defect": (inside[has_pixels] >= outside[has_pixels]).float().mean().item(),
        "median inside/outside max (defective)": ratio.item(),
        "median normal max / median inside max": normal_max.item(),
        "defective images without mask pixels": int((defective & ~masks.any(1)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    rows = [diagnose(d) for d in args.run_dirs]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
