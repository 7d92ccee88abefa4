"""Inference modes benchmark: latency, throughput, peak memory and accuracy per mode.

For every model x setup, the slots are trained once per feature choice (``per_tile``; and
``whole_image`` for tiled setups: it is part of the slot fingerprint) by a normal run (which also
measures ``sequential`` mode), then the same slots are measured in ``resident`` mode. One table:

    python benchmarks/inference_benchmark.py --models padim patchcore --setups sm256 sm512 ens4 ens9 \\
        --out outputs/inference_benchmark

Latency: batch size 1; throughput: batch size 8 (the run's speed protocol, conf ``speed:``).
Peak memory: model passes over the validation and test images (``rss`` on CPU: resident memory
above its value when the stage started). Image AUROC and pixel AUPRO on the test split.
Rows are appended to OUT/table.md as they finish (a partial run keeps its rows).

Speed only, of trained run dirs, all in one process (ratios between setups measured together):

    python benchmarks/inference_benchmark.py --measure outputs/runs/A outputs/runs/B ...

Where a batch-1 inference step of a frozen-backbone model spends its time (backbone vs the slots'
heads, resident models), with the bytes of slot weights each image reads:

    python benchmarks/inference_benchmark.py --split outputs/runs/A outputs/runs/B ...
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tiled_hydra.build import build_data, build_run, open_trained_run
from tiled_hydra.config import CONF_DIR as CONF
from tiled_hydra.inference.latency import measure_speed
from tiled_hydra.metrics.curves import aupro
from tiled_hydra.metrics.image import image_auroc
from tiled_hydra.pipeline import train
HEADER = ("| model | setup | mode | features | latency ms | throughput img/s | infer peak MiB | slot weights MiB "
          "| image AUROC | pixel AUPRO |\n|---|---|---|---|---|---|---|---|---|---|\n")


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def row(model, setup, mode, features, latency, throughput, peak, weights, auroc, pro) -> str:
    mib = 2**20
    return (f"| {model} | {setup} | {mode} | {features} | {latency:.0f} | {throughput:.2f} | {peak / mib:.0f} | "
            f"{weights / mib:.0f} | {auroc:.3f} | {pro:.3f} |\n")


def resident_row(cfg, run_dir: Path, results: dict) -> tuple:
    """The trained slots of ``run_dir`` measured in resident mode (same protocol as the run's speed)."""
    run = build_run(cfg, run_dir / "checkpoints", device=torch.device("cpu"))
    data = build_data(cfg, run.grid)
    engine = run.engine(keep=True, mode="resident")
    splits = [data.test] if data.val is None else [data.val, data.test]
    predictions = engine.predict(*(s.images for s in splits))
    peak = engine.peak_bytes
    maps, scores = predictions[-1]
    speed = measure_speed(engine, data.test.images, warmup=int(cfg.speed.warmup), repeats=int(cfg.speed.repeats),
                          throughput_batch_size=int(cfg.speed.batch_size))
    auroc = image_auroc(scores, data.test.labels)
    pro = aupro(maps, data.test.masks) if data.test.masks is not None else math.nan
    return speed["latency_ms"], speed["throughput_images_per_second"], peak, auroc, pro


def measure_run_dirs(run_dirs: list[Path], repeats: int) -> None:
    """Latency, throughput and peak memory of each run dir in each mode, in this one process."""
    print("| run dir | setup | features | mode | latency ms | throughput img/s | infer peak MiB (test images) |\n|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        for mode in ("sequential", "resident"):
            cfg, run = open_trained_run(run_dir, mode, "cpu")
            engine = run.engine(keep=True)
            images = build_data(cfg, run.grid).test.images
            speed = measure_speed(engine, images, warmup=4, repeats=repeats, throughput_batch_size=8)
            engine.predict(images)  # peak memory of the model passes over the test images
            print(f"| {run_dir.name} | {cfg.setup.name} | {cfg.inference.features} | {mode} | {speed['latency_ms']:.0f} | "
                  f"{speed['throughput_images_per_second']:.2f} | {engine.peak_bytes / 2**20:.0f} |", flush=True)
            del engine, run


def backbone_step(engine, image: torch.Tensor) -> list[torch.Tensor]:
    """The stages of every tile of one image, as the engine computes them (whole image or per tile)."""
    return engine.features.of_tiles(image, slice(0, len(image)), list(range(engine.grid.num_tiles)), hold=False)


def heads_step(engine, models: list, features: list[torch.Tensor]) -> int:
    """Every slot's head on its tiles' stages; returns the patch positions evaluated."""
    positions = 0
    for model, slot_tiles in zip(models, engine.slots):
        own = [f[slot_tiles] for f in features]
        model.predict_features(own, engine.grid.tile_size)
        positions += len(slot_tiles) * own[0].shape[-2] * own[0].shape[-1]
    return positions


def split_run_dirs(run_dirs: list[Path], repeats: int) -> None:
    """Batch-1 time of the backbone and of the slot heads, measured apart, for each run dir (one process)."""
    import statistics

    print("| run dir | setup | features | backbone ms | heads ms | heads share | patch positions | slot weights MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in run_dirs:
        cfg, run = open_trained_run(run_dir, "resident", "cpu")
        engine = run.engine(keep=True)
        data = build_data(cfg, run.grid)
        models = [engine.models.get(slot) for slot in range(len(engine.slots))]
        times: dict[str, list[float]] = {"backbone": [], "heads": []}
        with torch.no_grad():
            for k in range(repeats + 2):  # two warm-up images
                image = data.test.images[k % len(data.test)].unsqueeze(0)
                start = time.perf_counter()
                features = backbone_step(engine, image)
                middle = time.perf_counter()
                positions = heads_step(engine, models, features)
                if k >= 2:
                    times["backbone"].append(middle - start)
                    times["heads"].append(time.perf_counter() - middle)
        b, h = (1000 * statistics.median(times[p]) for p in ("backbone", "heads"))
        weights = sum(sum(t.numel() * t.element_size() for t in m.model.state_dict().values()) for m in models)
        print(f"| {run_dir.name} | {cfg.setup.name} | {cfg.inference.features} | {b:.0f} | {h:.0f} | {h / (b + h):.2f} | "
              f"{positions} | {weights / 2**20:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="+", type=Path, help="trained run dirs: speed and memory per mode only")
    parser.add_argument("--split", nargs="+", type=Path, help="trained run dirs: backbone vs heads time at batch 1")
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--setups", nargs="+", default=["sm256", "sm512", "ens4", "ens9"])
    parser.add_argument("--features", nargs="+", default=["per_tile", "whole_image"])
    parser.add_argument("--out", type=Path, default=Path("outputs/inference_benchmark"))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. model.max_steps=20")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of --measure/--split (1: comparable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        measure_run_dirs(args.measure, args.repeats)
        return
    if args.split:
        split_run_dirs(args.split, args.repeats)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "table.md"
    if not table.exists():
        table.write_text(HEADER)
    for model in args.models:
        for setup in args.setups:
            for features in args.features:
                if features == "whole_image" and setup in ("sm256", "sm512"):
                    continue  # a 1x1 grid: the whole image is the tile, whole_image == per_tile
                overrides = [f"+setup={setup}", f"model={model}", f"inference.features={features}", "logger=none",
                             "report.overlays=0", "speed.enabled=true", *args.extra]
                run_dir = args.out / f"{model}_{setup}_{features}"
                run_dir.mkdir(parents=True, exist_ok=True)
                cfg = compose_cfg(overrides)
                start = time.perf_counter()
                results = train(cfg, run_dir).results  # writes the config and results.json as the command does
                print(f"{model} {setup} {features}: run {time.perf_counter() - start:.0f} s", flush=True)
                weights = results["slot_weights_bytes"]
                with table.open("a") as f:
                    f.write(row(model, setup, "sequential", features, results["latency_ms"], results["throughput_images_per_second"],
                                results["infer_peak_mem_bytes"], weights, results["image_AUROC"], results["pixel_AUPRO"]))
                latency, throughput, peak, auroc, pro = resident_row(cfg, run_dir, results)
                with table.open("a") as f:
                    f.write(row(model, setup, "resident", features, latency, throughput, peak, weights, auroc, pro))
                print(table.read_text().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
