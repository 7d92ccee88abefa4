"""Benchmark: one ENS4 run trained sequentially vs. its slots split over local shards.

Runs the real command lines on the default offline data and prints a Markdown table of wall
times.  Sequential: one process, ``--threads`` torch threads.  Sharded: a joblib multirun of
``--shards`` processes with ``--threads / --shards`` threads each (so both use the same cores),
then one ``ensemble.stage=evaluate`` job.  The last line predicts the wall time on N devices
from the measured per-slot seconds: the slowest shard's summed slot time plus the evaluation.

    python benchmarks/shards_benchmark.py                       # ENS4 RD, 2 shards, 2 threads
    python benchmarks/shards_benchmark.py --model fastflow --setup ens9 --shards 3 --threads 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tiled_hydra", *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reverse_distillation")
    parser.add_argument("--setup", default="ens4")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (sequential: all in one process)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "shards_benchmark")
    parser.add_argument("extra", nargs="*", help="more overrides for every job, e.g. model.max_steps=50")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)  # wall times of a fresh run only (no resumed slots)
    base = [f"+setup={args.setup}", f"model={args.model}", "logger=none", "speed.enabled=false", *args.extra]
    slots = args.out / "slots"

    sequential = timed([*base, f"hydra.run.dir={args.out / 'sequential'}"], args.threads)
    train = timed(["-m", "hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={args.shards}", *base,
                   f"ensemble.num_shards={args.shards}", f"ensemble.shard=range({args.shards})",
                   f"ensemble.checkpoint_dir={slots}", f"hydra.sweep.dir={args.out / 'shards'}"],
                  max(1, args.threads // args.shards))
    evaluate = timed([*base, f"ensemble.checkpoint_dir={slots}", "ensemble.stage=evaluate",
                      f"hydra.run.dir={args.out / 'evaluate'}"], args.threads)

    seq = json.loads((args.out / "sequential" / "results.json").read_text())
    par = json.loads((args.out / "evaluate" / "results.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(slots.glob("slot_*.json"))]
    per_shard: dict[int, float] = {}
    for r in records:
        per_shard[r["shard"]] = per_shard.get(r["shard"], 0.0) + r["seconds"]
    slowest_slot = max(r["seconds"] for r in records)
    eval_only = evaluate  # the evaluation job's whole process (startup, data, prediction, metrics)

    print(f"\n{args.setup.upper()} {args.model}, {len(records)} slots, {args.threads} threads in all "
          f"(load before: {os.getloadavg()[0]:.1f})\n")
    print("| | wall s (whole process) | train wall s | summed slot s | image AUROC | pixel AUPRO |")
    print("|---|---|---|---|---|---|")
    print(f"| sequential, 1 process x {args.threads} threads | {sequential:.0f} | {seq['train_wall_seconds']:.0f} | "
          f"{seq['train_seconds']:.0f} | {seq['image_AUROC']:.4f} | {seq['pixel_AUPRO']:.4f} |")
    print(f"| {args.shards} shards x {max(1, args.threads // args.shards)} threads, then evaluate | {train + evaluate:.0f} "
          f"({train:.0f} + {evaluate:.0f}) | {par['train_wall_seconds']:.0f} | {par['train_seconds']:.0f} | "
          f"{par['image_AUROC']:.4f} | {par['pixel_AUPRO']:.4f} |")
    print(f"\nspeed-up of the whole job: {sequential / (train + evaluate):.2f}x; summed slot seconds per shard: "
          + ", ".join(f"shard {k}: {v:.0f}" for k, v in sorted(per_shard.items())))
    print(f"on {len(records)} devices (one slot each): ~{slowest_slot + eval_only:.0f} s "
          f"(slowest slot {slowest_slot:.0f} s + evaluation job {eval_only:.0f} s), vs {sequential:.0f} s sequential")


if __name__ == "__main__":
    main()
