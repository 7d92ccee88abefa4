"""Figure: the mean merged map of each model on the normal test images, one column per merge setting
(default: the paper's flat mean, tukey, hann) on one colour scale per model; tile seams dotted.

Tiles that live on their own scale show as blocks in the mean map of normal images (a defect-free
image should give a flat, structureless map). It reads the slots that
``calibration_benchmark.py`` trained (``OUT/DATASET/MODEL_ens9/none_flat``) and runs the inference
engine on the normal test images once per merge setting; each panel's title gives the block contrast
and the seam ridge over those images (metrics/seams.py), also printed as a Markdown table.

    python benchmarks/calibration_figure.py --cells outputs/benchmarks/calibration/default --out docs/results/calibration.png
    python benchmarks/calibration_figure.py --models patchcore --variants none:flat slot_position:hann
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tiled_hydra.build import build_data, open_trained_run  # noqa: E402
from tiled_hydra.core.tiling import TileGrid  # noqa: E402
from tiled_hydra.metrics.seams import block_contrast, map_spread, seam_ridge  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def mean_normal_map(cell: Path, calibration: str, window: str) -> dict:
    """The mean merged map of the cell's normal test images, their block contrast and seam ridge, the
    seams; kept in the cell (a re-run draws without predicting again)."""
    saved = cell / f"mean_normal_map_{calibration}_{window}.pt"
    kept = torch.load(saved, weights_only=True) if saved.is_file() else {}
    if "spread" not in kept or saved.stat().st_mtime < (cell / "none_flat" / "results.json").stat().st_mtime:
        cfg, run = open_trained_run(cell / "none_flat")
        data = build_data(cfg, run.grid)
        run.merge = dataclasses.replace(run.merge, calibration=calibration, window=window)
        maps = run.engine(keep=True)(data.test.images[data.test.labels == 0]).maps
        spread = map_spread(maps)
        kept = {"mean": maps.mean(0), "block_contrast": block_contrast(maps, run.grid, spread)[0], "spread": spread,
                "count": len(maps), "grid": [list(run.grid.image_size), list(run.grid.tile_size), list(run.grid.stride)]}
        torch.save(kept, saved)
    grid = TileGrid.create(*kept["grid"])
    # linear in the maps: the mean map with the spread of all their pixels gives the ridge of the images
    return {**kept, "seams": grid.seams(), "seam_ridge": seam_ridge(kept["mean"][None], grid, kept["spread"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "padim_ipca", "patchcore", "fastflow",
                                                         "reverse_distillation", "efficient_ad", "ddad"])
    parser.add_argument("--cells", type=Path, default=REPO / "outputs" / "benchmarks" / "calibration" / "default",
                        help="folder of the benchmark's MODEL_ens9 cells of one dataset")
    parser.add_argument("--variants", nargs="+", default=["none:flat", "none:tukey", "none:hann"],
                        help="CALIBRATION:WINDOW of each column")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "calibration.png")
    args = parser.parse_args()
    models = [m for m in args.models if (args.cells / f"{m}_ens9" / "none_flat" / "results.json").is_file()]
    if not models:
        raise SystemExit(f"no trained cell under {args.cells}: run benchmarks/calibration_benchmark.py first")
    variants = [tuple(v.split(":")) for v in args.variants]
    fig, axes = plt.subplots(len(models), len(variants), figsize=(3.2 * len(variants), 2.9 * len(models)),
                             squeeze=False, layout="constrained")
    print("| model | " + " | ".join(f"{c}/{w} block contrast | {c}/{w} seam ridge" for c, w in variants) + " |")
    print("|---|" + "---:|---:|" * len(variants))
    for row, model in zip(axes, models):
        panels = [mean_normal_map(args.cells / f"{model}_ens9", *variant) for variant in variants]
        low = min(float(p["mean"].quantile(0.01)) for p in panels)
        high = max(float(p["mean"].quantile(0.99)) for p in panels)
        for ax, (calibration, window), panel in zip(row, variants, panels):
            image = ax.imshow(panel["mean"].numpy(), cmap="magma", vmin=low, vmax=high)
            for seam in panel["seams"][0]:
                ax.axhline(seam - 0.5, color="white", lw=0.6, ls=":")
            for seam in panel["seams"][1]:
                ax.axvline(seam - 0.5, color="white", lw=0.6, ls=":")
            ax.set_title(f"calibration={calibration}, window={window}\nblock contrast {panel['block_contrast']:.3f}, "
                         f"seam ridge {panel['seam_ridge']:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(model, fontsize=10)
        fig.colorbar(image, ax=list(row), shrink=0.8, label="anomaly score")
        print(f"| {model} | " + " | ".join(f"{p['block_contrast']:.3f} | {p['seam_ridge']:.3f}" for p in panels) + " |",
              flush=True)
    fig.suptitle(f"Mean merged map of the {panels[0]['count']} normal test images (ENS9; dotted: tile seams)", fontsize=9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    # a palette of 256 colours (the colour map has 256): a third of the bytes, no visible change
    from PIL import Image

    Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
