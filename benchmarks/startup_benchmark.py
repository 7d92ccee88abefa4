"""Benchmark: how fast the main command answers, median of N repeats.

Four numbers, each from a fresh process of the real command line:

- config error: seconds from start to exit for ``model.net.n_features=-5`` (a usage error, exit 2;
  ``--error-args`` for another);
- --help: seconds from start to exit for ``--help``;
- first log line: seconds from start to the run's first log line (``run dir: ...``);
- startup stage: the run's own "startup" stage (process start to the first stage of the run, from
  its ``stages:`` log line), and the "data" stage after it, of a tiny PaDiM ENS9 run.

    OMP_NUM_THREADS=1 python benchmarks/startup_benchmark.py --repeats 5
    python benchmarks/startup_benchmark.py --repeats 3 --run-args +setup=sm256 model=patchcore logger=none
    python benchmarks/startup_benchmark.py --compare /tmp/before /tmp/after   # two copies of the package

Import costs per module: ``python -X importtime -m tiled_hydra +setup=ens9 model=padim logger=none ...``.
The machine's other work shows in every number: measure when it is quiet and compare medians. The
commands run in a temporary directory, so PYTHONPATH=DIR measures the tiled_hydra package in DIR.
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

COMMAND = [sys.executable, "-m", "tiled_hydra"]
RUN_ARGS = ["+setup=ens9", "model=padim", "logger=none", "dataset.n_train=6", "dataset.n_val=4", "dataset.n_test=6",
            "report.overlays=0"]
ERROR_ARGS = ["+setup=ens9", "model=padim", "logger=none", "model.net.n_features=-5"]
STAGE = re.compile(r"(\w+) ([\d.]+) s \(cpu ([\d.]+) s")


def timed(args: list[str], env: dict, cwd: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, proc


def first_line_and_stages(args: list[str], env: dict, cwd: str) -> tuple[float, dict[str, float]]:
    """Seconds to the first stdout line, and the run's stage times from its ``stages:`` line."""
    started = time.perf_counter()
    proc = subprocess.Popen([*COMMAND, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    stages: dict[str, float] = {}
    for line in proc.stdout:
        first = first if first is not None else time.perf_counter() - started
        if "stages: " in line:
            for name, wall, cpu in STAGE.findall(line.split("stages: ", 1)[1]):
                stages[name], stages[f"{name} cpu"] = float(wall), float(cpu)
    err = proc.stderr.read()
    if proc.wait() != 0 or not stages:
        sys.exit(f"the run failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return first or float("nan"), stages


def measure(env: dict, tmp: str, error_args: list[str], run_args: list[str] | None) -> dict[str, float]:
    """One repeat of every number (see the module doc), the run in a new run dir (not a finished one's
    results read back)."""
    out = {}
    out["config error (exit 2)"], proc = timed([*error_args, f"hydra.run.dir={tmp}/error"], env, tmp)
    assert proc.returncode == 2, proc.stderr
    out["--help"], proc = timed(["--help"], env, tmp)
    assert proc.returncode == 0, proc.stderr
    if run_args is not None:
        run_dir = tempfile.mkdtemp(prefix="run", dir=tmp)
        out["first log line"], stages = first_line_and_stages([*run_args, f"hydra.run.dir={run_dir}"], env, tmp)
        out["startup stage"] = stages.get("startup", float("nan"))
        out["data stage"] = stages.get("data", float("nan"))
        out["startup + data"] = out["startup stage"] + out["data stage"]
        # CPU seconds: less inflated than wall time when other jobs share the cores
        out["startup stage, cpu"] = stages.get("startup cpu", float("nan"))
        out["startup + data, cpu"] = out["startup stage, cpu"] + stages.get("data cpu", float("nan"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-args", nargs="*", default=RUN_ARGS, help="overrides of the timed run")
    parser.add_argument("--error-args", nargs="*", default=ERROR_ARGS, help="a command that must exit 2")
    parser.add_argument("--no-run", action="store_true", help="only the config error and --help")
    parser.add_argument("--compare", nargs="*", default=[], metavar="DIR",
                        help="directories that each hold a tiled_hydra package (e.g. two checkouts): measured in "
                             "turn within every repeat, so that both see the same load")
    args = parser.parse_args()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.setdefault("OMP_NUM_THREADS", "1")
    variants = {d: {**env, "PYTHONPATH": d} for d in args.compare} or {"installed": env}
    rows: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, variant_env in variants.items():
                numbers = measure(variant_env, tmp, args.error_args, None if args.no_run else args.run_args)
                for what, seconds in numbers.items():
                    rows[name].setdefault(what, []).append(seconds)
            print(f"  repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    run = "" if args.no_run else f"; run: {' '.join(args.run_args)}"
    print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end{run}; median (min-max) of {args.repeats} "
          "repeats, seconds\n")
    names = list(variants)
    print("| what | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for what in rows[names[0]]:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in (rows[n][what] for n in names)]
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
