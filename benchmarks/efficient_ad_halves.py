"""Which half of EfficientAD's map carries the detection?

EfficientAD's map is ``0.5 ST + 0.5 AE`` after each half's quantile normalisation. For each trained
``model=efficient_ad`` run dir given, this re-predicts the run's test images (read-only, with the
run's own engine and merge) three times: with the map as trained, with the ST half only and with the
AE half only, and prints image AUROC (the run's score) and pixel AUROC of each. A half is switched
off by widening its normalisation range a million-fold, which makes its term a constant to 1e-6.

    python benchmarks/efficient_ad_halves.py outputs/ead/sm256_s1_base outputs/ead/ens9_...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tiled_hydra.metrics.image import image_auroc
from tiled_hydra.build import build_data, open_trained_run
from torchmetrics.functional.classification import binary_auroc

OFF = 1e6  # range multiplier that turns a half's normalised term into (almost) a constant


def halves(run_dir: Path) -> list[dict]:
    cfg, run = open_trained_run(run_dir, device="cpu")
    if cfg.model.name != "efficient_ad":
        raise SystemExit(f"{run_dir}: not an efficient_ad run ({cfg.model.name})")
    test = build_data(cfg, run.grid).test
    engine = run.engine(keep=True)
    models = [engine.models.get(s).model for s in range(len(engine.models))]
    fitted = [m.quantiles.clone() for m in models]
    rows = []
    for name, off in (("0.5 ST + 0.5 AE", None), ("ST only", "ae"), ("AE only", "st")):
        for model, q in zip(models, fitted):
            q = q.clone()
            if off is not None:
                a, b = (2, 3) if off == "ae" else (0, 1)
                q[b] = q[a] + OFF * (q[b] - q[a])
            model.quantiles.copy_(q)
        maps, scores = engine.predict(test.images, measure_memory=False)[0]
        row = {"run": run_dir.name, "map": name, "image AUROC": image_auroc(scores, test.labels)}
        if test.masks is not None:
            row["pixel AUROC"] = float(binary_auroc(maps.flatten(), test.masks.flatten().long()))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | map | image AUROC | pixel AUROC |\n|---|---|---|---|")
    for run_dir in args.run_dirs:
        for row in halves(run_dir):
            print(f"| {row['run']} | {row['map']} | {row['image AUROC']:.3f} | {row.get('pixel AUROC', float('nan')):.3f} |", flush=True)


if __name__ == "__main__":
    main()
