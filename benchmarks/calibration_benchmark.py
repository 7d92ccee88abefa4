"""Benchmark: slot calibration and window blending against the paper's raw merge, per model and dataset.

Each (dataset, model) cell trains its ENS9 slots once (the real command line; resumable), then
evaluates every merge variant from the same checkpoints (``ensemble.stage=evaluate`` with a shared
``ensemble.checkpoint_dir``): calibration none / slot / slot_position x window flat / hann (or those named), seam
smoothing as configured. One Markdown table: image AUROC, pixel AUROC, pixel AUPRO and the block
contrast of the merged maps on normal test images (metrics/seams.py).

    python benchmarks/calibration_benchmark.py --models padim patchcore --datasets default hard:coffee hard:brick
    python benchmarks/calibration_benchmark.py --models fastflow reverse_distillation efficient_ad \\
        --datasets default -- model.max_steps=100      # overrides after -- apply to every run

``default`` is the default synthetic data (brick); ``hard:CATEGORY`` the hard preset's category.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dataset_overrides(name: str) -> list[str]:
    if name == "default":
        return []
    preset, _, category = name.partition(":")
    return [f"dataset.preset={preset}", f"dataset.category={category}"]


def run(overrides: list[str], run_dir: Path) -> dict:
    if not (run_dir / "results.json").exists():
        cmd = [sys.executable, "-m", "tiled_hydra", *overrides, "logger=none", "progress=false", "report.overlays=0",
               "report.maps=false", f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{run_dir.name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads((run_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--datasets", nargs="+", default=["default", "hard:coffee", "hard:brick"])
    parser.add_argument("--setup", default="ens9")
    parser.add_argument("--calibrations", nargs="+", default=["none", "slot", "slot_position"])
    parser.add_argument("--windows", nargs="+", default=["flat", "hann"])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "calibration")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run (after --)")
    args = parser.parse_args()
    print("| dataset | model | calibration | window | image AUROC | pixel AUROC | pixel AUPRO | block contrast | off-seam control |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for dataset in args.datasets:
        for model in args.models:
            cell = args.out / dataset.replace(":", "_") / f"{model}_{args.setup}"
            base = [f"+setup={args.setup}", f"model={model}", *dataset_overrides(dataset), *args.overrides]
            started = time.perf_counter()
            # trains the slots (merge settings do not change them), merged as the paper merges
            trained = run([*base, "merge.calibration=none", "merge.window=flat"], cell / "none_flat")
            print(f"<!-- {dataset} {model}: trained in {trained['train_seconds']:.0f} s "
                  f"(wall {time.perf_counter() - started:.0f} s) -->", flush=True)
            for calibration, window in [(c, w) for c in args.calibrations for w in args.windows]:
                r = trained if (calibration, window) == ("none", "flat") else run(
                    [*base, f"merge.calibration={calibration}", f"merge.window={window}", "ensemble.stage=evaluate",
                     f"ensemble.checkpoint_dir={cell / 'none_flat' / 'checkpoints'}"], cell / f"{calibration}_{window}")
                contrast, control = r.get("block_contrast"), r.get("block_contrast_off_seam")
                print(f"| {dataset} | {model} | {calibration} | {window} | {r['image_AUROC']:.3f} | "
                      f"{r.get('pixel_AUROC', float('nan')):.3f} | {r.get('pixel_AUPRO', float('nan')):.3f} | "
                      f"{'n/a' if contrast is None else f'{contrast:.3f}'} | {'n/a' if control is None else f'{control:.3f}'} |",
                      flush=True)


if __name__ == "__main__":
    main()
