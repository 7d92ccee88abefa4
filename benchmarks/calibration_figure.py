"""Figure: the mean merged map of each model on the normal test images, with the paper's merge and
with another merge setting, side by side on one colour scale per model; tile seams dotted.

Tiles that live on their own scale show as blocks in the mean map of normal images (a defect-free
image should give a flat, structureless map). It reads the slots that
``calibration_benchmark.py`` trained (``OUT/DATASET/MODEL_ens9/none_flat``) and runs the inference
engine on the normal test images once per merge setting; each panel's title gives the block contrast
over those images (metrics/seams.py).

    python benchmarks/calibration_figure.py --models padim patchcore --out docs/results/calibration.png
    python benchmarks/calibration_figure.py --right none:tukey --cells /work/bench/calibration/default
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
from tiled_hydra.metrics.seams import block_contrast  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def mean_normal_map(run, images: torch.Tensor, calibration: str, window: str) -> tuple[torch.Tensor, float]:
    run.merge = dataclasses.replace(run.merge, calibration=calibration, window=window)
    maps = run.engine(keep=True)(images).maps
    return maps.mean(0), block_contrast(maps, run.grid)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "padim_ipca", "patchcore", "fastflow",
                                                         "reverse_distillation", "efficient_ad", "ddad"])
    parser.add_argument("--cells", type=Path, default=REPO / "outputs" / "benchmarks" / "calibration" / "default",
                        help="folder of the benchmark's MODEL_ens9 cells of one dataset")
    parser.add_argument("--left", default="none:flat", help="CALIBRATION:WINDOW of the left column")
    parser.add_argument("--right", default="none:tukey", help="CALIBRATION:WINDOW of the right column")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "calibration.png")
    args = parser.parse_args()
    models = [m for m in args.models if (args.cells / f"{m}_ens9" / "none_flat" / "results.json").is_file()]
    if not models:
        raise SystemExit(f"no trained cell under {args.cells}: run benchmarks/calibration_benchmark.py first")
    variants = [tuple(v.split(":")) for v in (args.left, args.right)]
    fig, axes = plt.subplots(len(models), 2, figsize=(6.4, 3.1 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        cfg, run = open_trained_run(args.cells / f"{model}_ens9" / "none_flat")
        data = build_data(cfg, run.grid)
        normal = data.test.images[data.test.labels == 0]
        panels = [mean_normal_map(run, normal, *variant) for variant in variants]
        low = min(float(m.quantile(0.01)) for m, _ in panels)
        high = max(float(m.quantile(0.99)) for m, _ in panels)
        for ax, (calibration, window), (mean_map, contrast) in zip(row, variants, panels):
            image = ax.imshow(mean_map.numpy(), cmap="magma", vmin=low, vmax=high)
            for seam in run.grid.seams()[0]:
                ax.axhline(seam - 0.5, color="white", lw=0.6, ls=":")
            for seam in run.grid.seams()[1]:
                ax.axvline(seam - 0.5, color="white", lw=0.6, ls=":")
            ax.set_title(f"calibration={calibration}, window={window}\nblock contrast {contrast:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(model, fontsize=10)
        fig.colorbar(image, ax=list(row), shrink=0.8, label="anomaly score")
        print(f"{model}: " + ", ".join(f"{c}/{w} {p[1]:.3f}" for (c, w), p in zip(variants, panels)),
              flush=True)
    fig.suptitle(f"Mean merged map of the {len(normal)} normal test images (ENS9; dotted: tile seams)", fontsize=9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
