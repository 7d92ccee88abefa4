"""Benchmark: model x backbone x setup on the hard synthetic preset, object and texture.

Runs the real command line once per cell (resumable: a cell with results.json is read, not re-run)
and prints one Markdown table: image AUROC, pixel AUPRO, train and inference time, peak memory,
plus the ENS9 - SM256 pixel AUPRO gain per (model, backbone, category).

    python benchmarks/hard_benchmark.py --models padim patchcore --backbones efficientnet_lite0 \\
        efficientnet_lite1 efficientnet_lite2 --categories coffee brick --setups sm256 ens9

The hard preset's images are 1024 px; SM256 and ENS9 see them downsized to 256 and 512 px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from setups_benchmark import REPO, run_one  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    parser.add_argument("--categories", nargs="+", default=["coffee", "brick"])
    parser.add_argument("--setups", nargs="+", default=["sm256", "ens9"])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "hard")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    rows = []
    for category in args.categories:
        for model in args.models:
            for backbone in args.backbones:
                for setup in args.setups:
                    extra = ["dataset.preset=hard", f"dataset.category={category}", f"backbone={backbone}",
                             "speed.enabled=false", *args.overrides]
                    r = run_one(model, setup, args.out / category / backbone, extra)
                    rows.append(r)
                    print(row(r), flush=True)
    print("\n" + table(rows))


def row(r: dict) -> str:
    mib = 2**20
    return (f"| {r['category']} | {r['model']} | {r['backbone']} | {r['setup']} | {r['image_AUROC']:.3f} | "
            f"{r.get('pixel_AUPRO', float('nan')):.3f} | {r['train_seconds']:.0f} | {r['infer_seconds']:.0f} | "
            f"{r['train_peak_mem_bytes'] / mib:.0f} | {r['infer_peak_mem_bytes'] / mib:.0f} |")


def table(rows: list[dict]) -> str:
    lines = ["| category | model | backbone | setup | image AUROC | pixel AUPRO | train s | infer s (val+test) "
             "| train peak MiB | infer peak MiB |", "|" + "|".join(["---"] * 10) + "|"]
    lines += [row(r) for r in rows]
    cells = {(r["category"], r["model"], r["backbone"], r["setup"]): r for r in rows}
    gains = []
    for (category, model, backbone, setup), r in cells.items():
        base = cells.get((category, model, backbone, "sm256"))
        if setup == "ens9" and base:
            gains.append(f"| {category} | {model} | {backbone} | {r['pixel_AUPRO'] - base['pixel_AUPRO']:+.3f} | "
                         f"{r['image_AUROC'] - base['image_AUROC']:+.3f} |")
    if gains:
        lines += ["", "| category | model | backbone | ENS9 - SM256 pixel AUPRO | ENS9 - SM256 image AUROC |",
                  "|---|---|---|---|---|", *gains]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
