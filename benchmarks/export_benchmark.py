"""Exported runs (tiled_hydra_runtime, onnxruntime) against the torch engine: equality and speed.

Equality: for every model x setup, a run on the default data with few images and steps (equality
does not depend on accuracy), exported; the runtime's maps and labels on the test images against
the engine's (max |difference| of the maps normalised with the run's postprocessor):

    python benchmarks/export_benchmark.py equality --models padim patchcore fastflow reverse_distillation \\
        efficient_ad padim_ipca --setups ens9 sm256 --out outputs/export_benchmark

Speed: latency (batch 1) and throughput (batch 8) of the runtime and of the engine on 1 and 2
threads, with the CPU time per image (all threads of the process: what the image costs when other
jobs share the cores), and the artifact's size on disk (runs trained by ``equality`` or any
finished run dirs):

    python benchmarks/export_benchmark.py speed outputs/export_benchmark/runs/padim_ens9 ... --threads 1 2

Each mode prints a markdown table and appends its rows to OUT/<mode>.md as they finish.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SMALL_DATA = ["dataset.n_train=6", "dataset.n_val=4", "dataset.n_test=6"]
STEPS = {"fastflow": ["model.max_steps=20"], "reverse_distillation": ["model.max_steps=20"],
         "efficient_ad": ["model.max_steps=20", "model.net.distill.steps=20"], "ddad": ["model.max_steps=20"]}


def train(model: str, setup: str, run_dir: Path, extra: list[str]) -> None:
    """A run whose slots and thresholds (postprocess.json) exist: all an export needs."""
    if (run_dir / "postprocess.json").is_file():
        return
    args = [f"+setup={setup}", f"model={model}", *SMALL_DATA, *STEPS.get(model, []), "logger=none",
            "report.overlays=0", "report.maps=false", "progress=false", *extra, f"hydra.run.dir={run_dir}"]
    print(f"training {run_dir.name}: python -m tiled_hydra {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "tiled_hydra", *args], cwd=REPO, stdout=subprocess.DEVNULL)
    if not (run_dir / "postprocess.json").is_file():
        raise SystemExit(f"{run_dir}: the run failed before its thresholds were fitted; see {run_dir / 'tiled_hydra.log'}")


def append(table: Path, header: str, row: str) -> None:
    if not table.exists():
        table.write_text(header)
    with table.open("a") as f:
        f.write(row + "\n")
    print(row, flush=True)


def equality(args) -> None:
    from tiled_hydra.build import build_data, open_trained_run
    from tiled_hydra.export.compare import agreement
    from tiled_hydra.export.onnx import export_run
    import tiled_hydra_runtime

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    header = ("| model | setup | merge | images | max abs map difference | max abs score difference | labels identical |\n"
              "|---|---|---|---:|---:|---:|---|\n")
    for model in args.models:
        for setup in args.setups:
            name = f"{model}_{setup}" + (f"_{args.tag}" if args.tag else "")
            run_dir, artifact = out / "runs" / name, out / "exports" / name
            train(model, setup, run_dir, args.extra)
            if not (artifact / "manifest.json").is_file():
                export_run(run_dir, artifact)
            cfg, run = open_trained_run(run_dir, device="cpu")
            images = build_data(cfg, run.grid).test.images
            engine = run.engine(keep=True)(images)
            maps, scores = tiled_hydra_runtime.load(artifact, threads=args.threads[0]).predict(images.numpy())
            a = agreement(run_dir, images, maps, scores, engine)
            merge = f"{cfg.merge.score}, {cfg.merge.calibration}, {cfg.merge.window}"
            append(out / "equality.md", header, f"| {model} | {setup} | {merge} | {a.images} | {a.max_map_difference:.1e} | "
                                               f"{a.max_score_difference:.1e} | {'yes' if a.labels_identical else 'NO'} |")


def timed(step, images: torch.Tensor, batch_size: int, warmup: int, repeats: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process, every thread) per image of ``step`` on batches of ``batch_size``."""
    wall = cpu = 0.0
    for i in range(warmup + repeats):
        batch = images[(torch.arange(batch_size) + i * batch_size) % len(images)]
        w, c = time.perf_counter(), time.process_time()
        step(batch)
        if i >= warmup:
            wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
    return wall / (repeats * batch_size), cpu / (repeats * batch_size)


def speed(args) -> None:
    from tiled_hydra.build import build_data, open_trained_run
    from tiled_hydra.export.onnx import export_run
    import tiled_hydra_runtime

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = ("| model | setup | runtime | threads | latency ms (batch 1) | CPU ms per image (batch 1) | "
              "throughput img/s (batch 8) | CPU ms per image (batch 8) | artifact MiB |\n"
              "|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    for run_dir in map(Path, args.runs):
        artifact = out / "exports" / run_dir.name
        if not (artifact / "manifest.json").is_file():
            export_run(run_dir, artifact)
        size = sum(f.stat().st_size for f in artifact.iterdir()) / 2**20
        cfg, run = open_trained_run(run_dir, device="cpu")
        images = build_data(cfg, run.grid).test.images
        for threads in args.threads:
            torch.set_num_threads(threads)
            detector = tiled_hydra_runtime.load(artifact, threads=threads)
            steps = {"onnx": lambda batch: detector.predict(batch.numpy()), "torch": run.engine(keep=True)}
            for name, step in steps.items():
                latency, cpu_1 = timed(step, images, 1, args.warmup, args.repeats)
                per_image, cpu_8 = timed(step, images, 8, 1, max(1, args.repeats // 8))
                append(out / "speed.md", header,
                       f"| {cfg.model.name} | {cfg.setup.name} | {name} | {threads} | {1000 * latency:.0f} | {1000 * cpu_1:.0f} | "
                       f"{1 / per_image:.2f} | {1000 * cpu_8:.0f} | {f'{size:.1f}' if name == 'onnx' else '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    eq = sub.add_parser("equality")
    eq.add_argument("--models", nargs="+", default=["padim", "patchcore", "fastflow", "reverse_distillation", "efficient_ad",
                                                     "padim_ipca"])
    eq.add_argument("--setups", nargs="+", default=["ens9", "sm256"])
    eq.add_argument("--extra", nargs="*", default=[], help="more overrides of every run (e.g. merge.window=hann)")
    eq.add_argument("--tag", default="", help="suffix of the run names (runs with --extra)")
    sp = sub.add_parser("speed")
    sp.add_argument("runs", nargs="+")
    sp.add_argument("--warmup", type=int, default=1)
    sp.add_argument("--repeats", type=int, default=8)
    for p in (eq, sp):
        p.add_argument("--out", default="outputs/export_benchmark")
        p.add_argument("--threads", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    (equality if args.mode == "equality" else speed)(args)


if __name__ == "__main__":
    main()
