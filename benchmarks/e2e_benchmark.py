"""End-to-end timing of a 1200x800 job: ENS9 PaDiM on 40 + 45 images of 1200x800 px, whole process.

Runs each configuration ``--repeats`` times, interleaved (so a noisy minute hits both alike), each
as its own ``python -m tiled_hydra`` process in a fresh run dir, and prints the median wall, user
and system time, minor page faults, max RSS and the run's own stage times (its "stages:" log line).

    python benchmarks/e2e_data.py /tmp/e2e
    OMP_NUM_THREADS=2 python benchmarks/e2e_benchmark.py /tmp/e2e --repeats 5
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGURATIONS = {
    "default (sequential, per_tile)": [],
    "fast (resident, whole_image)": ["inference.mode=resident", "inference.features=whole_image"],
}
STAGES = ("startup", "data", "train", "predict", "postprocess+metrics", "report")


def run_once(root: Path, extra: list[str], run_dir: Path) -> dict:
    command = [sys.executable, "-m", "tiled_hydra", "+setup=ens9", "model=padim", "dataset=mvtec", f"dataset.root={root}",
               "dataset.category=coffee", "speed.enabled=false", "logger=none", "progress=false",
               f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage (max RSS included)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        log = out.read()
    if child.returncode != 0:
        raise SystemExit(f"job failed ({child.returncode}): {(log.strip().splitlines() or ['?'])[-1]}")
    row = {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "faults_M": usage.ru_minflt / 1e6,
           "max_rss_GiB": usage.ru_maxrss / 2**20}
    line = next((l for l in log.splitlines() if "stages:" in l), "")
    for stage in STAGES:
        found = re.search(rf"(?:^|; |stages: ){re.escape(stage)} ([\d.]+) s", line)
        row[stage] = float(found.group(1)) if found else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder benchmarks/e2e_data.py wrote")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["default", "fast"], help="one configuration")
    args = parser.parse_args()
    configs = {k: v for k, v in CONFIGURATIONS.items() if args.only is None or k.startswith(args.only)}
    rows: dict[str, list[dict]] = {name: [] for name in configs}
    scratch = Path(tempfile.mkdtemp(prefix="e2e_bench_"))
    try:
        for repeat in range(args.repeats):
            for name, extra in configs.items():
                row = run_once(args.root, extra, scratch / f"{len(rows[name])}_{abs(hash(name))}")
                rows[name].append(row)
                print(f"# {name}, run {repeat + 1}: {row['wall']:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    keys = ["wall", "user", "sys", "faults_M", "max_rss_GiB", *STAGES]
    print(f"median of {args.repeats} runs each\n")
    print("| configuration | " + " | ".join(keys) + " | wall of each run |")
    print("|---|" + "---|" * (len(keys) + 1))
    for name, runs in rows.items():
        medians = [statistics.median(r[k] for r in runs) for k in keys]
        each = ", ".join(f"{r['wall']:.1f}" for r in runs)
        print(f"| {name} | " + " | ".join(f"{m:.1f}" if k != "faults_M" else f"{m:.2f}" for k, m in zip(keys, medians)) + f" | {each} |")


if __name__ == "__main__":
    main()
