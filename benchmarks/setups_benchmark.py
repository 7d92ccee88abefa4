"""Benchmark: train time, inference throughput, peak memory and accuracy per setup and model.

Runs the real command line once per (model, setup) on the default offline data and prints
a Markdown table; memory and time are also given relative to SM256 of the same model.

    python benchmarks/setups_benchmark.py --models padim --setups sm256 sm512 ens9
    python benchmarks/setups_benchmark.py --models padim patchcore fastflow reverse_distillation \
        --setups sm256 sm512 ens4 ens9
    python benchmarks/setups_benchmark.py --models efficient_ad --setups sm256 sm512 ens4 ens9
    python benchmarks/setups_benchmark.py --models ddad --setups sm256 ens9   # paper 003's diffusion model

EfficientAD distils its teacher once per backbone (cached, see docs/efficient_ad.md): the first
run that needs it pays that one-time cost inside its train time, so warm the cache first, e.g.
with ``--models efficient_ad --setups sm256``, before comparing train times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_one(model: str, setup: str, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{model}_{setup}"
    if not (run_dir / "results.json").exists():  # re-running the benchmark resumes
        cmd = [sys.executable, "-m", "tiled_hydra", f"+setup={setup}", f"model={model}", "logger=none",
               f"hydra.run.dir={run_dir}", *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{model}/{setup} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        print(f"  {model}/{setup} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return json.loads((run_dir / "results.json").read_text())


def table(rows: list[dict]) -> str:
    base = {r["model"]: r for r in rows if r["setup"] == "sm256"}
    header = ("| model | setup | tiles | models | train s | infer img/s | train peak MiB | infer peak MiB "
              "| infer peak / SM256 | image AUROC | pixel AUPRO |")
    lines = [header, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        ref = base.get(r["model"])
        ratio = f"{r['infer_peak_mem_bytes'] / ref['infer_peak_mem_bytes']:.2f}" if ref else "n/a"
        lines.append(
            f"| {r['model']} | {r['setup']} | {r['num_tiles']} | {r['num_models']} | {r['train_seconds']:.1f} "
            f"| {r['infer_images_per_second']:.2f} | {r['train_peak_mem_bytes'] / 2**20:.0f} "
            f"| {r['infer_peak_mem_bytes'] / 2**20:.0f} | {ratio} | {r['image_AUROC']:.3f} | {r.get('pixel_AUPRO', float('nan')):.3f} |"
        )
    return "\n".join(lines) + f"\n\nmemory kind: {rows[0]['mem_kind']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim"])
    parser.add_argument("--setups", nargs="+", default=["sm256", "sm512", "ens9"])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "setups")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    rows = [run_one(m, s, args.out, args.overrides) for m in args.models for s in args.setups]
    print(table(rows))


if __name__ == "__main__":
    main()
