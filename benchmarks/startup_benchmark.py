"""Benchmark: how fast the main command answers, median of N repeats.

Four numbers, each from a fresh process of the real command line:

- config error: seconds from start to exit for ``model.net.n_features=-5`` (a usage error, exit 2);
- --help: seconds from start to exit for ``--help``;
- first log line: seconds from start to the run's first log line (``run dir: ...``);
- startup stage: the run's own "startup" stage (process start to the first stage of the run, from
  its ``stages:`` log line), and the "data" stage after it, of a tiny PaDiM ENS9 run.

    OMP_NUM_THREADS=1 python benchmarks/startup_benchmark.py --repeats 5
    python benchmarks/startup_benchmark.py --repeats 3 --run-args +setup=sm256 model=patchcore

Import costs per module: ``python -X importtime -m tiled_hydra +setup=ens9 model=padim logger=none ...``.
The machine's other work shows in every number: measure when it is quiet and compare medians.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "tiled_hydra"]
RUN_ARGS = ["+setup=ens9", "model=padim", "logger=none", "dataset.n_train=6", "dataset.n_val=4", "dataset.n_test=6",
            "report.overlays=0"]
STAGE = re.compile(r"(\w+) ([\d.]+) s \(cpu")


def timed(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([*COMMAND, *args], cwd=REPO, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, proc


def first_line_and_stages(args: list[str], env: dict) -> tuple[float, dict[str, float]]:
    """Seconds to the first stdout line, and the run's stage times from its ``stages:`` line."""
    started = time.perf_counter()
    proc = subprocess.Popen([*COMMAND, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    stages: dict[str, float] = {}
    for line in proc.stdout:
        first = first if first is not None else time.perf_counter() - started
        if "stages: " in line:
            stages = {name: float(seconds) for name, seconds in STAGE.findall(line.split("stages: ", 1)[1])}
    err = proc.stderr.read()
    if proc.wait() != 0:
        sys.exit(f"the run failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return first or float("nan"), stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-args", nargs="*", default=RUN_ARGS, help="overrides of the timed run")
    parser.add_argument("--no-run", action="store_true", help="only the config error and --help")
    args = parser.parse_args()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.setdefault("OMP_NUM_THREADS", "1")
    rows: dict[str, list[float]] = {"config error (exit 2)": [], "--help": [], "first log line": [],
                                    "startup stage": [], "data stage": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            seconds, proc = timed(["+setup=ens9", "model=padim", "logger=none", "model.net.n_features=-5",
                                   f"hydra.run.dir={tmp}/error"], env)
            assert proc.returncode == 2, proc.stderr
            rows["config error (exit 2)"].append(seconds)
            seconds, proc = timed(["--help"], env)
            assert proc.returncode == 0, proc.stderr
            rows["--help"].append(seconds)
            if not args.no_run:
                first, stages = first_line_and_stages([*args.run_args, f"hydra.run.dir={tmp}/run{repeat}"], env)
                rows["first log line"].append(first)
                rows["startup stage"].append(stages.get("startup", float("nan")))
                rows["data stage"].append(stages.get("data", float("nan")))
            print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    run = "" if args.no_run else f"; run: {' '.join(args.run_args)}"
    print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end{run}\n")
    print(f"| what | median s | min s | max s | repeats |\n|---|---:|---:|---:|---:|")
    for name, values in rows.items():
        if values:
            print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | {len(values)} |")


if __name__ == "__main__":
    main()
